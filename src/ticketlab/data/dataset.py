"""The in-memory dataset: tensors split into train/val/test and normalised."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ticketlab.errors import DataError

from .augment import augment_crop_flip

AUGMENTATIONS = ("crop_flip",)


@dataclass
class Dataset:
    """Train/val/test tensors held in memory.

    Inputs are float32 of shape (N, *input_shape), labels int64. `mean` and `std` are the
    per-channel (dim 1) statistics of the raw training inputs that were used to normalise all
    three splits (zeros and ones where nothing was normalised).
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
        shape = tuple(self.x_train.shape[1:])
        for split in ("train", "val", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if len(x) != len(y):
                raise DataError(
                    f"dataset '{self.name}': {split} has {len(x)} inputs but {len(y)} labels"
                )
            if tuple(x.shape[1:]) != shape:
                raise DataError(
                    f"dataset '{self.name}': {split} inputs have shape {tuple(x.shape[1:])}, "
                    f"train inputs {shape}"
                )
        if self.augment is not None:
            if self.augment not in AUGMENTATIONS:
                raise DataError(
                    f"unknown augmentation '{self.augment}'; choose from: "
                    + ", ".join(AUGMENTATIONS)
                )
            if len(shape) != 3:
                raise DataError(
                    f"augmentation '{self.augment}' needs image inputs (C, H, W); "
                    f"dataset '{self.name}' has input shape {shape}"
                )
        channels = shape[0] if shape else 1
        if self.mean is None:
            self.mean = torch.zeros(channels)
        if self.std is None:
            self.std = torch.ones(channels)

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

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
    y = torch.as_tensor(y)
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise DataError(f"{what} must be integer class indices, got dtype {y.dtype}")
    if y.dim() != 1:
        raise DataError(f"{what} must be one-dimensional, got shape {tuple(y.shape)}")
    return y.to(torch.int64)


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
) -> Dataset:
    """Hold out the validation split, convert to float32 / `scale`, and normalise.

    Inputs may be raw (e.g. uint8): the split is taken before conversion so large image sets
    are copied to float only once.
    """
    x_train, x_test = torch.as_tensor(x_train), torch.as_tensor(x_test)
    y_train, y_test = _as_labels(y_train, "training labels"), _as_labels(y_test, "test labels")
    if len(x_train) != len(y_train):
        raise DataError(f"{len(x_train)} training inputs but {len(y_train)} training labels")
    if len(x_train) == 0:
        raise DataError(f"dataset '{name}' has no training examples")
    if val_size < 0:
        raise DataError(f"val_size must be >= 0, got {val_size}")
    if x_val is not None or y_val is not None:
        if x_val is None or y_val is None:
            raise DataError("give both x_val and y_val, or neither")
        if val_size:
            raise DataError("give either x_val/y_val or val_size, not both")
        x_val, y_val = torch.as_tensor(x_val), _as_labels(y_val, "validation labels")
    elif val_size:
        if val_size >= len(x_train):
            raise DataError(
                f"val_size {val_size} leaves no training data: dataset '{name}' has "
                f"{len(x_train)} training examples"
            )
        perm = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(split_seed))
        # Sorted so the kept examples stay in file order; batches are permuted anyway.
        val_idx, keep_idx = perm[:val_size].sort().values, perm[val_size:].sort().values
        x_val, y_val = x_train[val_idx], y_train[val_idx]
        x_train, y_train = x_train[keep_idx], y_train[keep_idx]
    else:
        x_val = x_train[:0]
        y_val = y_train[:0]

    # float() copies integer data; clone() makes sure float inputs are never modified in place.
    def to_float(x):
        return x.float() / scale if x.dtype != torch.float32 or scale != 1 else x.clone()

    x_train, x_val, x_test = to_float(x_train), to_float(x_val), to_float(x_test)
    mean = std = None
    if normalize:
        mean, std = channel_stats(x_train)
        for x in (x_train, x_val, x_test):
            _normalise(x, mean, std)

    if num_classes is None:
        labels = torch.cat([y_train, y_val, y_test])
        num_classes = int(labels.max()) + 1 if len(labels) else 0
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
) -> Dataset:
    """A Dataset from the user's own tensors.

    Either pass x_val/y_val or hold `val_size` examples out of the training set by
    `split_seed`. `num_classes` defaults to the largest label + 1. With `normalize`, inputs are
    standardised per channel (dim 1) with training statistics.
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
    )
