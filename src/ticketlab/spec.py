"""Experiment knobs as one frozen dataclass, their validation, and the run hash.

A spec holds every knob of an experiment. The run's identity is a hash of the
*resolved* spec (step strings turned into iterations) with fields at their
defaults left out, so adding a knob later keeps old run directories valid.
Counts that only extend a run (levels, replicates, controls) are not hashed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .errors import UsageError

OPTIMIZERS = ("sgd", "adam", "rmsprop")
SCHEDULES = ("constant", "step", "cosine")
SCOPES = ("layerwise", "global")
PROTOCOLS = ("rewind", "finetune", "lr-rewind")
CONTROLS = ("reinit", "reshuffle", "signed-constant", "random-mask")
# how masked Linear layers train: masked dense, CSR kernels, or picked per layer by timing
KERNELS = ("dense", "sparse", "auto")
# where models, masks and in-memory data live: auto is cuda when there is a CUDA device
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")

# Fields that never change a run's meaning: where things are, how much to print,
# and counts that only extend a run.
NOT_HASHED = frozenset(
    {
        "levels",
        "replicates",
        "controls",
        "data_dir",
        "runs_dir",
        "quiet",
        "eval_batch_size",
        "kernels",  # the same training, only its speed (and float rounding) differs
        "compile",  # likewise: the same graph, compiled
        # where a run trains does not change what it is (a run started on a GPU resumes
        # on the CPU and the other way round)
        "device",
        # when checkpoints are written: a resume continues exactly from any of them
        "checkpoint_every",
        "checkpoint_seconds",
        "jobs",
        "vectorize",  # the same training as stacks: results agree to float tolerance
        "workers",
        # callables cannot be hashed or stored: `objective` names them in the hash
        "loss_fn",
        "metrics_fn",
        # extra weight files over training: what is trained is the same
        "save_every",
    }
)
# Fields that are never written to spec.json (not JSON values).
CALLABLE_FIELDS = ("loss_fn", "metrics_fn")
# Knobs a dense baseline does not use.
PRUNING_FIELDS = frozenset(
    {
        "criterion",
        "prune_fraction",
        "conv_prune_fraction",
        "output_prune_fraction",
        "scope",
        "dense_layers",
        "protocol",
        "rewind",
        "retrain_steps",
    }
)
STEP_FIELDS = (
    "steps",
    "warmup",
    "eval_every",
    "rewind",
    "retrain_steps",
    "checkpoint_every",
    "save_every",
)

_STEP_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(it|ep)\s*$")


def parse_steps(value: str | int, steps_per_epoch: int | None = None, name: str = "steps") -> int:
    """Turn a budget like ``"2000it"`` or ``"3ep"`` into iterations.

    A bare integer is read as iterations. Epochs need ``steps_per_epoch``.
    """
    if isinstance(value, bool):
        raise UsageError(f"{name}: {value!r} is not a step string like '2000it' or '3ep'")
    if isinstance(value, int):
        if value < 0:
            raise UsageError(f"{name}: {value} is negative")
        return value
    text = str(value).strip()
    if text.isdigit():
        return int(text)
    m = _STEP_RE.match(text)
    if not m:
        raise UsageError(f"{name}: {value!r} is not a step string like '2000it' or '3ep'")
    amount, unit = float(m.group(1)), m.group(2)
    if unit == "it":
        if amount != int(amount):
            raise UsageError(f"{name}: {value!r} has a fractional number of iterations")
        return int(amount)
    if steps_per_epoch is None:
        raise UsageError(f"{name}: {value!r} is in epochs but the epoch length is unknown")
    return int(round(amount * steps_per_epoch))


def check_step_string(value, name: str) -> None:
    if value is None:
        return
    parse_steps(value, steps_per_epoch=1, name=name)


@dataclass(frozen=True)
class Spec:
    """Every knob of a training or lottery experiment.

    Budgets are step strings (``"50000it"``, ``"40ep"``); ``steps`` is the budget
    of each training phase, so of each lottery level.

    The defaults are the setup of the method's paper (``SETUP`` says which; each
    method's spec class overrides what its paper sets differently), so a bare
    command learns; the budgets stay short (one epoch), and presets give the
    papers' full ones.
    """

    SETUP = (
        "Frankle & Carbin 2019, LeNet-300-100: Adam 1.2e-3, batch 60, Glorot normal init, "
        "20% of each layer per level, 10% of the output layer"
    )

    method: str = "lottery"
    # data
    dataset: str = "fashion_mnist"
    val_size: int | None = None  # None: the dataset's default
    augment: bool | None = None  # None: the dataset's default (on for CIFAR-10)
    data_dir: str | None = None
    # data read while training (imagefolder): DataLoader worker processes (the batches are
    # a function of seed and step, not of this), what a bad image does, the image side
    workers: int = 0
    bad_files: str = "fail"
    image_size: int | None = None
    # fraction of training labels changed to another class (He et al. 2022); 0: clean
    label_noise: float = 0.0
    # model
    model: str = "lenet_300_100"
    width: float = 1.0
    init: str = "xavier_normal"
    # training
    steps: str = "1ep"
    batch_size: int = 60
    optimizer: str = "adam"
    lr: float = 1.2e-3
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    schedule: str = "constant"
    milestones: tuple[str, ...] = ()
    gamma: float = 0.1
    warmup: str = "0it"
    eval_every: str = "1ep"
    eval_batch_size: int = 1000
    # save the weights every this many steps (None: never), for analyses over training
    save_every: str | None = None
    # a checkpoint every this many steps or this many seconds, whichever comes first
    # (seconds 0: steps only); Ctrl-C and SIGTERM always write one
    checkpoint_every: str = "1000it"
    checkpoint_seconds: float = 60.0
    # dense, sparse (CSR kernels for every masked Linear layer) or auto (per layer, by a
    # short timing, below 20% density); see ticketlab.masks.sparse
    kernels: str = "auto"
    # mixed precision: "none" (float32) or "bf16" (autocast; weights, masks and optimizer
    # state stay float32, so pruned weights stay exactly zero)
    amp: str = "none"
    compile: bool = False  # torch.compile the forward pass (not hashed)
    # where the run trains: auto (cuda when there is a CUDA device, else cpu), cpu, cuda
    # or cuda:N (not hashed; see resolve_device)
    device: str = "auto"
    # seeds: each derived from `seed` (and the replicate) unless given
    seed: int = 0
    init_seed: int | None = None
    data_seed: int | None = None
    aug_seed: int | None = None
    # objective (Python API): loss_fn(outputs, targets) -> scalar mean loss, and
    # metrics_fn(outputs, targets) -> {name: batch mean} in place of accuracy; None: the
    # cross-entropy and accuracy of classification. `objective` names them in the run's
    # hash (default: each callable's module and qualified name; see objective_name)
    loss_fn: Callable | None = None
    metrics_fn: Callable | None = None
    objective: str | None = None
    # the evaluation that selects the best step (early stopping): val_loss (lowest) or
    # val_<metric> (highest); a "min:" or "max:" prefix says which way explicitly
    select: str = "val_loss"
    # stop a phase after this many evaluations without a better `select` (0: never)
    patience: int = 0
    # what is prunable: module kinds (linear, conv, attention, embedding) and parameter-name
    # globs; () is Linear and Conv weights. `prunable_exclude` removes kinds or globs.
    prunable: tuple[str, ...] = ()
    prunable_exclude: tuple[str, ...] = ()
    # pruning
    criterion: str = "magnitude"
    prune_fraction: float = 0.2
    conv_prune_fraction: float | None = None  # None: same as prune_fraction
    output_prune_fraction: float | None = 0.1  # None: same as the layer's kind
    scope: str = "layerwise"
    dense_layers: tuple[str, ...] = ()
    # protocol for the surviving weights (Renda et al. 2020)
    protocol: str = "rewind"
    rewind: str = "0it"
    retrain_steps: str | None = None  # None: T - k
    # extent (not hashed: asking for more extends the run)
    levels: int = 3
    replicates: int = 1
    jobs: int = 1  # worker processes for independent replicates (not hashed)
    vectorize: bool = False  # replicates/controls as one stack of copies (not hashed)
    controls: tuple[str, ...] = ()
    runs_dir: str = "runs"
    quiet: bool = False

    def __post_init__(self) -> None:
        from .models import canonical_init

        # aliases (glorot_normal) must not change the run's hash
        object.__setattr__(self, "init", canonical_init(self.init))
        for name in ("milestones", "dense_layers", "controls", "prunable", "prunable_exclude"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        from .masks.select import canonical_selection

        inc, exc = canonical_selection(self.prunable, self.prunable_exclude)
        object.__setattr__(self, "prunable", inc)
        object.__setattr__(self, "prunable_exclude", exc)
        if self.objective is None and (self.loss_fn is not None or self.metrics_fn is not None):
            object.__setattr__(self, "objective", objective_name(self.loss_fn, self.metrics_fn))
        validate(self)

    def replace(self, **changes) -> Spec:
        return dataclasses.replace(self, **changes)


def callable_name(fn) -> str:
    """``module.qualname`` of a function, or of a callable object's class."""
    target = fn if hasattr(fn, "__qualname__") else type(fn)
    qual = getattr(target, "__qualname__", None)
    if qual is None or "<" in qual:
        raise UsageError(
            f"the objective {qual or fn!r} has no stable name (a lambda, a nested function or a "
            "partial): give the spec objective='a name for it', which identifies the run"
        )
    return f"{getattr(target, '__module__', '?')}.{qual}"


def objective_name(loss_fn, metrics_fn) -> str:
    """The name a custom objective is hashed by: ``loss=<name>;metrics=<name>``.

    Only the names are hashed, not the code: changing a function's body keeps its runs,
    so rename it (or pass a new ``objective``) when its meaning changes.
    """
    parts = []
    if loss_fn is not None:
        parts.append("loss=" + callable_name(loss_fn))
    if metrics_fn is not None:
        parts.append("metrics=" + callable_name(metrics_fn))
    return ";".join(parts)


def select_key(select: str) -> tuple[str, bool]:
    """``(key, lower_is_better)`` of a ``select`` value (see :class:`Spec`)."""
    mode, sep, key = select.partition(":")
    if not sep:
        key, mode = select, ""
    if mode not in ("", "min", "max") or not key.startswith("val_") or len(key) <= 4:
        raise UsageError(
            f"select must be val_loss or val_<metric> (optionally min:/max:); got {select!r}"
        )
    lower = key == "val_loss" if not mode else mode == "min"
    return key, lower


def _choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} '{value}'; choose from: {', '.join(choices)}")


def _fraction(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, (int, float)) or not 0.0 < float(value) < 1.0:
        raise UsageError(f"{name} must be a fraction in (0, 1); got {value}")


def normalize_target(spec) -> None:
    """Check a method's ``sparsity``/``density`` target and keep it as a density.

    Either may be given, not both; a sparsity S is stored as density 1 - S, so the
    two spellings name the same run.
    """
    density, sparsity = spec.density, spec.sparsity
    if density is not None and sparsity is not None:
        raise UsageError("give --sparsity or --density, not both")
    for name, value in (("sparsity", sparsity), ("density", density)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1
        ):
            raise UsageError(f"{name} must be in (0, 1); got {value}")
    if sparsity is not None:
        object.__setattr__(spec, "density", round(1.0 - float(sparsity), 12))
        object.__setattr__(spec, "sparsity", None)


def validate(spec: Spec) -> None:
    """Check what can be checked without the data or the model."""
    _choice("optimizer", spec.optimizer, OPTIMIZERS)
    _choice("schedule", spec.schedule, SCHEDULES)
    _choice("scope", spec.scope, SCOPES)
    _choice("protocol", spec.protocol, PROTOCOLS)
    _choice("kernels", spec.kernels, KERNELS)
    _choice("amp", spec.amp, ("none", "bf16"))
    check_device(spec.device)
    if spec.compile and spec.vectorize:
        raise UsageError("--compile and --vectorize do not combine yet: give one of them")
    _choice("bad-files", spec.bad_files, ("fail", "skip"))
    if isinstance(spec.workers, bool) or not isinstance(spec.workers, int) or spec.workers < 0:
        raise UsageError(f"workers must be an integer >= 0; got {spec.workers}")
    if spec.image_size is not None and spec.image_size < 1:
        raise UsageError(f"image size must be >= 1; got {spec.image_size}")
    from .pruning.criteria import CRITERIA, criterion_names  # lazy: no import cycle

    allowed = criterion_names(spec.method)
    fn = CRITERIA.get(spec.criterion)
    if fn is not None and spec.criterion not in allowed:
        why = (
            "it is accumulated while training (use ticketlab gradual)"
            if getattr(fn, "needs_training", False)
            else "it needs data, the input shape or the initial weights, which this command "
            "does not give it"
        )
        raise UsageError(
            f"criterion '{spec.criterion}' cannot be used by {spec.method}: {why}; "
            f"choose from: {', '.join(allowed)}"
        )
    _choice("criterion", spec.criterion, allowed)
    for c in spec.controls:
        _choice("control", c, CONTROLS)
    _fraction("prune fraction", spec.prune_fraction)
    _fraction("conv prune fraction", spec.conv_prune_fraction)
    _fraction("output prune fraction", spec.output_prune_fraction)
    for name in STEP_FIELDS:
        check_step_string(getattr(spec, name), name.replace("_", "-"))
    for m in spec.milestones:
        check_step_string(m, "milestone")
    if parse_steps(spec.steps, 1) <= 0:
        raise UsageError("steps must be positive")
    if spec.batch_size <= 0:
        raise UsageError(f"batch size must be positive; got {spec.batch_size}")
    for name, label in (
        ("lr", "learning rate"),
        ("width", "width"),
        ("momentum", "momentum"),
        ("weight_decay", "weight decay"),
        ("gamma", "gamma"),
    ):
        if not math.isfinite(getattr(spec, name)):
            raise UsageError(f"{label} must be a finite number; got {getattr(spec, name)}")
    if spec.lr <= 0:
        raise UsageError(f"learning rate must be positive; got {spec.lr}")
    if spec.width <= 0:
        raise UsageError(f"width must be positive; got {spec.width}")
    if not 0.0 <= spec.momentum < 1.0:
        raise UsageError(f"momentum must be in [0, 1); got {spec.momentum}")
    if spec.momentum and spec.optimizer not in ("sgd", "rmsprop"):
        raise UsageError("momentum needs --optimizer sgd or rmsprop (Adam has its own betas)")
    if spec.weight_decay < 0:
        raise UsageError(f"weight decay must be >= 0; got {spec.weight_decay}")
    if spec.gamma <= 0:
        raise UsageError(f"gamma must be positive; got {spec.gamma}")
    if not math.isfinite(spec.checkpoint_seconds) or spec.checkpoint_seconds < 0:
        raise UsageError(f"checkpoint seconds must be >= 0; got {spec.checkpoint_seconds}")
    if spec.eval_batch_size <= 0:
        raise UsageError(f"eval batch size must be positive; got {spec.eval_batch_size}")
    if (
        isinstance(spec.label_noise, bool)
        or not isinstance(spec.label_noise, (int, float))
        or not 0.0 <= spec.label_noise < 1.0
    ):
        raise UsageError(f"label noise must be a fraction in [0, 1); got {spec.label_noise}")
    if spec.save_every is not None and parse_steps(spec.save_every, 1, "save-every") <= 0:
        raise UsageError("save-every must be positive")
    if spec.val_size is not None and spec.val_size < 0:
        raise UsageError(f"val size must be >= 0; got {spec.val_size}")
    if spec.levels < 0:
        raise UsageError(f"levels must be >= 0; got {spec.levels}")
    if spec.replicates < 1:
        raise UsageError(f"replicates must be >= 1; got {spec.replicates}")
    if isinstance(spec.jobs, bool) or not isinstance(spec.jobs, int) or spec.jobs < 1:
        raise UsageError(f"jobs must be an integer >= 1; got {spec.jobs}")
    if spec.vectorize and spec.jobs > 1:
        raise UsageError("--vectorize and --jobs N are alternatives: give one of them")
    if spec.nesterov and spec.optimizer != "sgd":
        raise UsageError("nesterov needs --optimizer sgd")
    key, _ = select_key(spec.select)
    if key not in ("val_loss", "val_accuracy") and spec.metrics_fn is None and spec.loss_fn is None:
        raise UsageError(
            f"select {spec.select!r}: the classification objective reports val_loss and "
            "val_accuracy only; a metrics_fn adds others"
        )
    if isinstance(spec.patience, bool) or not isinstance(spec.patience, int) or spec.patience < 0:
        raise UsageError(f"patience must be an integer >= 0; got {spec.patience}")
    for fn, what in ((spec.loss_fn, "loss_fn"), (spec.metrics_fn, "metrics_fn")):
        if fn is not None and not callable(fn):
            raise UsageError(f"{what} must be callable; got {fn!r}")


def check_device(device) -> None:
    """Check the form of a ``device`` value (whether it is there is :func:`resolve_device`'s
    question, asked when a run starts: a spec that names a GPU can be read anywhere)."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise UsageError(f"unknown device {device!r}; choose from: {', '.join(DEVICES)}")


def resolve_device(device: str, jobs: int = 1):
    """The :class:`torch.device` a run trains on, or a UsageError naming what there is.

    ``auto`` is this process's CUDA device when there is one (under ``torchrun``, the
    rank's ``LOCAL_RANK``), else the CPU; with ``jobs`` > 1 it is the CPU, because the
    worker processes are forked and a forked process cannot use CUDA.
    """
    import os

    import torch

    check_device(device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        device = "cuda" if count and jobs <= 1 else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    there = ", ".join(["cpu"] + [f"cuda:{i}" for i in range(count)])
    index = local if device == "cuda" else int(device.partition(":")[2])
    if index >= count:
        why = "no CUDA device" if not count else f"no CUDA device {index}"
        raise UsageError(f"device {device!r}: this machine has {why}; available: {there}")
    if jobs > 1:
        raise UsageError(
            f"--jobs {jobs} forks worker processes, which cannot use CUDA: give --jobs 1 "
            f"(or --vectorize) to train on {device}, or --device cpu"
        )
    return torch.device("cuda", index)


def spec_fields(cls: type = None) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in fields(cls or Spec)}


def coerce(name: str, text: str, cls: type = None):
    """Parse a ``--set key=value`` string into the type of the field ``name``."""
    known = spec_fields(cls)
    if name not in known:
        raise UsageError(f"unknown setting '{name}'; choose from: {', '.join(sorted(known))}")
    default = known[name].default
    annotation = str(known[name].type)
    if text.lower() in ("none", "null") and "None" in annotation:
        return None
    try:
        if "tuple" in annotation:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        if "bool" in annotation:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if "float" in annotation:
            return float(text)
        if "int" in annotation and "str" not in annotation:
            return int(text)
    except ValueError:
        raise UsageError(f"setting '{name}': cannot read {text!r} as {annotation}") from None
    del default
    return text


@dataclass(frozen=True)
class Resolved:
    """Values that need the dataset: iterations for every step string."""

    steps_per_epoch: int
    steps: int
    warmup: int
    eval_every: int
    rewind: int
    retrain_steps: int
    milestones: tuple[int, ...] = field(default_factory=tuple)
    checkpoint_every: int = 1000


def resolve(spec: Spec, steps_per_epoch: int) -> Resolved:
    spe = steps_per_epoch
    steps = parse_steps(spec.steps, spe, "steps")
    rewind = parse_steps(spec.rewind, spe, "rewind")
    if rewind >= steps:
        raise UsageError(f"rewind point {rewind} must be before the end of training ({steps})")
    retrain = steps - rewind if spec.retrain_steps is None else parse_steps(spec.retrain_steps, spe)
    if not 0 < retrain <= steps:
        raise UsageError(f"retrain-steps must be in (0, {steps}]; got {retrain}")
    eval_every = parse_steps(spec.eval_every, spe, "eval-every")
    if eval_every <= 0:
        raise UsageError("eval-every must be positive")
    checkpoint_every = parse_steps(spec.checkpoint_every, spe, "checkpoint-every")
    if checkpoint_every <= 0:
        raise UsageError("checkpoint-every must be positive")
    return Resolved(
        steps_per_epoch=spe,
        steps=steps,
        warmup=parse_steps(spec.warmup, spe, "warmup"),
        eval_every=eval_every,
        rewind=rewind,
        retrain_steps=retrain,
        milestones=tuple(parse_steps(m, spe, "milestone") for m in spec.milestones),
        checkpoint_every=checkpoint_every,
    )


def resolved_dict(spec: Spec, steps_per_epoch: int) -> dict:
    """All fields, with step strings replaced by iterations."""
    d = dataclasses.asdict(spec)
    for name in CALLABLE_FIELDS:  # named by `objective`
        d.pop(name, None)
    r = resolve(spec, steps_per_epoch)
    for name in ("steps", "warmup", "eval_every", "rewind"):
        d[name] = getattr(r, name)
    d["retrain_steps"] = r.retrain_steps
    d["milestones"] = list(r.milestones)
    for k, v in d.items():
        if isinstance(v, tuple):
            d[k] = list(v)
    return d


def unhashed_fields(spec: Spec) -> frozenset:
    """Fields left out of ``spec``'s hash: :data:`NOT_HASHED`, the pruning knobs of a
    dense ``train`` run, and the ``EXTENDS`` fields a method's spec class declares
    (counts or variants that only add to a run, e.g. more tasks)."""
    own = getattr(type(spec), "EXTENDS", frozenset())
    return NOT_HASHED | (PRUNING_FIELDS if spec.method == "train" else frozenset()) | own


def identity(spec: Spec, steps_per_epoch: int) -> dict:
    """The hashed part: resolved fields that differ from the resolved defaults."""
    mine = resolved_dict(spec, steps_per_epoch)
    # a method may subclass Spec with knobs of its own; its defaults are the base
    base = resolved_dict(
        type(spec)(method=spec.method, dataset=spec.dataset, model=spec.model), steps_per_epoch
    )
    out = {"method": spec.method, "dataset": spec.dataset, "model": spec.model}
    skip = unhashed_fields(spec)
    for k, v in mine.items():
        if k in skip:
            continue
        if v != base[k]:
            out[k] = v
    return out


def spec_hash(ident: dict) -> str:
    text = json.dumps(ident, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def derive_seed(seed: int, replicate: int, purpose: str) -> int:
    """A 63-bit seed for one purpose (init, data order, augmentation, a control)."""
    digest = hashlib.sha256(f"{seed}/{replicate}/{purpose}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
