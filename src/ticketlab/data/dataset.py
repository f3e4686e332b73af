"""The in-memory dataset: tensors split into train/val/test and normalised.

Inputs may be one tensor, a tuple or a dict of tensors (see :mod:`.structure`); integer and
bool inputs (token ids, masks) are kept as they are, and only floating inputs are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketlab.errors import DataError

from . import structure
from .augment import augment_crop_flip

AUGMENTATIONS = ("crop_flip",)


@dataclass
class Dataset:
    """Train/val/test tensors held in memory.

    Inputs are a tensor of shape (N, *input_shape) (float32 for the named datasets), or a
    tuple or dict of tensors batched along dim 0; labels are int64 class indices, or with
    ``num_classes`` 0 any targets (float values, sequences, a tuple or dict) that a user's
    loss reads. `mean` and `std` are the per-channel (dim 1) statistics of the raw training
    inputs that were used to normalise all three splits (zeros and ones where nothing was
    normalised; None for tuple or dict inputs).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    augment: str | None = None
    mean: torch.Tensor | None = None
    std: torch.Tensor | None = None

    def __post_init__(self):
        shape = structure.shapes(self.x_train)
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            nx, ny = structure.length(x), structure.length(y)
            if nx != ny:
                raise DataError(f"dataset '{self.name}': {split} has {nx} inputs but {ny} labels")
            if structure.shapes(x) != shape:
                raise DataError(
                    f"dataset '{self.name}': {split} inputs have shape {structure.shapes(x)}, "
                    f"train inputs {shape}"
                )
        if self.augment is not None:
            if self.augment not in AUGMENTATIONS:
                raise DataError(
                    f"unknown augmentation '{self.augment}'; choose from: "
                    + ", ".join(AUGMENTATIONS)
                )
            if not torch.is_tensor(self.x_train) or len(shape) != 3:
                raise DataError(
                    f"augmentation '{self.augment}' needs image inputs (C, H, W); "
                    f"dataset '{self.name}' has input shape {shape}"
                )
        if not torch.is_tensor(self.x_train):
            return
        channels = shape[0] if shape else 1
        if self.mean is None:
            self.mean = torch.zeros(channels)
        if self.std is None:
            self.std = torch.ones(channels)

    @property
    def input_shape(self):
        """One example's shape (a tuple or dict of shapes for structured inputs)."""
        return structure.shapes(self.x_train)

    @property
    def n_train(self) -> int:
        return structure.length(self.y_train)

    def train_examples(self, idx: torch.Tensor):
        """Training inputs and targets of the examples ``idx`` (for scoring criteria)."""
        return structure.take(self.x_train, idx), structure.take(self.y_train, idx)

    def probe_input(self):
        """What shape-based probes (multiply-add counts) feed the model: the input shape for
        a floating tensor, else the first training example (integer or structured inputs
        cannot be made up from a shape)."""
        if structure.is_plain_float(self.x_train):
            return self.input_shape
        return structure.rows(self.x_train, 0, 1)

    def augment_batch(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Augment a training batch (identity when the dataset has no augmentation)."""
        if self.augment is None:
            return x
        # Pad with what a raw zero pixel becomes after normalisation, so padding then
        # normalising (the usual order) and this give the same image.
        fill = (-self.mean / self.std).to(x.device, x.dtype)
        return augment_crop_flip(x, generator, fill=fill)


def _channel_dims(x: torch.Tensor) -> list[int]:
    return [d for d in range(x.dim()) if d != 1]


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (dim 1) mean and population std; a constant channel gets std 1."""
    if x.dim() == 1:
        x = x[:, None]
    var, mean = torch.var_mean(x, dim=_channel_dims(x), correction=0)
    std = var.sqrt()
    # A constant channel carries no information; dividing by 1 keeps it finite.
    return mean, torch.where(std > 0, std, torch.ones_like(std))


def _normalise(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    shape = [1, -1] + [1] * (x.dim() - 2) if x.dim() > 1 else [-1]
    return x.sub_(mean.view(shape)).div_(std.view(shape))


def _as_labels(y, what: str) -> torch.Tensor:
    if isinstance(y, dict) or (isinstance(y, (tuple, list)) and y and torch.is_tensor(y[0])):
        raise DataError(
            f"{what} must be integer class indices; for other targets pass targets='values'"
        )
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(
            f"{what} must be integer class indices, got dtype {y.dtype} "
            "(for regression or other targets pass targets='values')"
        )
    if y.dim() != 1:
        raise DataError(f"{what} must be one-dimensional, got shape {tuple(y.shape)}")
    return y.to(torch.int64)


TARGETS = ("classes", "values")


def _as_targets(y, what: str, targets: str):
    if targets == "classes":
        return _as_labels(y, what)
    # values: any dtype and structure; floats as float32, like the inputs
    y = structure.as_structure(y, what)
    return structure.map_leaves(lambda t: t.float() if t.dtype.is_floating_point else t, y)


def build(
    name: str,
    x_train,
    y_train,
    x_test,
    y_test,
    *,
    num_classes: int | None = None,
    val_size: int = 0,
    split_seed: int = 0,
    x_val=None,
    y_val=None,
    scale: float = 1.0,
    normalize: bool = True,
    augment: str | None = None,
    targets: str = "classes",
) -> Dataset:
    """Hold out the validation split, convert to float32 / `scale`, and normalise.

    Inputs may be raw (e.g. uint8 images with `scale` 255): the split is taken before
    conversion so large image sets are copied to float only once. With `scale` 1, integer
    and bool inputs stay as they are (token ids, masks); floating ones become float32.
    Normalisation applies to floating inputs only. Inputs may be a tensor, a tuple or a
    dict of tensors; `targets` ``values`` accepts any targets (no class labels).
    """
    if targets not in TARGETS:
        raise DataError(f"unknown targets '{targets}'; choose from: {', '.join(TARGETS)}")
    x_train = structure.as_structure(x_train, "training inputs")
    x_test = structure.as_structure(x_test, "test inputs")
    y_train = _as_targets(y_train, "training labels", targets)
    y_test = _as_targets(y_test, "test labels", targets)
    n = structure.length(x_train)
    if n != structure.length(y_train):
        raise DataError(f"{n} training inputs but {structure.length(y_train)} training labels")
    if n == 0:
        raise DataError(f"dataset '{name}' has no training examples")
    if val_size < 0:
        raise DataError(f"val_size must be >= 0, got {val_size}")
    if x_val is not None or y_val is not None:
        if x_val is None or y_val is None:
            raise DataError("give both x_val and y_val, or neither")
        if val_size:
            raise DataError("give either x_val/y_val or val_size, not both")
        x_val = structure.as_structure(x_val, "validation inputs")
        y_val = _as_targets(y_val, "validation labels", targets)
    elif val_size:
        if val_size >= n:
            raise DataError(
                f"val_size {val_size} leaves no training data: dataset '{name}' has "
                f"{n} training examples"
            )
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
        # Sorted so the kept examples stay in file order; batches are permuted anyway.
        val_idx, keep_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
        x_val, y_val = structure.take(x_train, val_idx), structure.take(y_train, val_idx)
        x_train, y_train = structure.take(x_train, keep_idx), structure.take(y_train, keep_idx)
    else:
        x_val = structure.rows(x_train, 0, 0)
        y_val = structure.rows(y_train, 0, 0)

    # float() copies integer data; clone() makes sure inputs are never modified in place.
    def convert(x):
        if x.dtype.is_floating_point or scale != 1:
            return x.float() / scale if x.dtype != torch.float32 or scale != 1 else x.clone()
        return x.clone()  # integer or bool inputs, kept as they are

    x_train, x_val, x_test = (structure.map_leaves(convert, x) for x in (x_train, x_val, x_test))
    mean = std = None
    if normalize:
        if torch.is_tensor(x_train):
            if not x_train.dtype.is_floating_point:
                raise DataError(
                    f"normalize needs floating inputs; dataset '{name}' has "
                    f"{structure.describe(x_train)} (integer inputs are kept as they are)"
                )
            mean, std = channel_stats(x_train)
            for x in (x_train, x_val, x_test):
                _normalise(x, mean, std)
        else:  # each floating leaf with its own statistics
            keys = range(len(x_train)) if not isinstance(x_train, dict) else list(x_train)
            floating = [k for k in keys if x_train[k].dtype.is_floating_point]
            if not floating:
                raise DataError(
                    f"normalize needs floating inputs; dataset '{name}' has "
                    f"{structure.describe(x_train)}"
                )
            for k in floating:
                m, s = channel_stats(x_train[k])
                for x in (x_train, x_val, x_test):
                    _normalise(x[k], m, s)

    if targets == "values":
        num_classes = 0 if num_classes is None else num_classes
    elif num_classes is None:
        labels = torch.cat([y_train, y_val, y_test])
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    if targets == "classes":
        for split, y in (("training", y_train), ("validation", y_val), ("test", y_test)):
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
                raise DataError(
                    f"dataset '{name}': {split} labels must lie in 0..{num_classes - 1}, "
                    f"found {int(y.min())}..{int(y.max())}"
                )
    return Dataset(
        name, x_train, y_train, x_val, y_val, x_test, y_test, num_classes, augment, mean, std
    )


def from_tensors(
    x_train,
    y_train,
    x_test,
    y_test,
    x_val=None,
    y_val=None,
    val_size: int = 0,
    split_seed: int = 0,
    num_classes: int | None = None,
    name: str = "custom",
    normalize: bool = False,
    augment: str | None = None,
    targets: str = "classes",
) -> Dataset:
    """A Dataset from the user's own tensors.

    Inputs may be a tensor, a tuple or a dict of tensors batched along dim 0 (the model is
    called as ``model(x)``, ``model(*x)`` or ``model(**x)``); integer and bool inputs are
    kept as they are, floating ones become float32. Either pass x_val/y_val or hold
    `val_size` examples out of the training set by `split_seed`. `num_classes` defaults to
    the largest label + 1. With `normalize`, floating inputs are standardised per channel
    (dim 1) with training statistics. `targets` ``classes`` (the default) wants integer
    labels; ``values`` keeps any targets (regression values, sequences, a tuple or dict)
    for a user's loss, and `num_classes` is then 0.
    """
    return build(
        name,
        x_train,
        y_train,
        x_test,
        y_test,
        num_classes=num_classes,
        val_size=val_size,
        split_seed=split_seed,
        x_val=x_val,
        y_val=y_val,
        normalize=normalize,
        augment=augment,
        targets=targets,
    )
