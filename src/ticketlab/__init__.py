"""ticketlab: a PyTorch laboratory for sparse neural networks.

The Python API mirrors the command line::

    import ticketlab as tl
    data = tl.data.load("fashion_mnist")
    model = tl.models.build("lenet_300_100", data.input_shape, data.num_classes)
    init = tl.snapshot(model)
    mask = tl.Mask.dense(model)
    spec = tl.TrainSpec(steps="1ep", optimizer="adam", lr=1.2e-3, batch_size=60)
    for level in range(3):
        tl.train(model, data, spec, mask=mask)
        mask = tl.prune(model, mask, fraction=0.2)
        tl.rewind(model, init, mask)
"""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait collapse throughput when the cores are
# shared (seen: 5x slower on a busy 2-core machine); passive waiting costs little
# when they are not. Only takes effect if torch is not imported yet.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from torch import nn

from . import data, models
from ._version import __version__
from .data import Dataset, from_tensors
from .errors import DataError, RunInterrupted, UsageError
from .experiment import Experiment, run_on_module
from .export import load_exported
from .load import load_model
from .masks import Mask, model_density, prunable_weights, set_prunable
from .methods.lottery import LotteryExperiment, lottery
from .protocols import random_mask, random_reinit, reshuffle, rewind, signed_constant, snapshot
from .pruning import layer_fractions
from .pruning import prune as prune_mask
from .spec import Spec
from .train import accuracy_metrics, evaluate, train

# One spec class holds every knob; the name says what it is used for.
TrainSpec = Spec
LotterySpec = Spec


def prune(
    model: nn.Module,
    mask: Mask,
    fraction: float = 0.2,
    criterion: str = "magnitude",
    scope: str = "layerwise",
    conv_fraction: float | None = None,
    output_fraction: float | None = None,
    dense: tuple[str, ...] = (),
    generator=None,
) -> Mask:
    """Remove ``fraction`` of the remaining weights (per layer, or globally) by ``criterion``."""
    fractions = layer_fractions(model, mask, fraction, conv_fraction, output_fraction, dense)
    return prune_mask(model, mask, fractions, scope=scope, criterion=criterion, generator=generator)


def shrink(
    model: nn.Module,
    criterion: str = "l1",
    density: float = 0.5,
    allocation: str = "layerwise",
    x=None,
    residual: bool = False,
) -> tuple[nn.Module, dict]:
    """Remove whole units (neurons, channels): ``(smaller model, unit masks)``.

    Scores by ``criterion`` (``l1``, ``l2``, ``bn-scale``, ``redundancy`` with
    examples ``x``), keeps ``density`` of the units (``layerwise`` or
    ``global``) and returns a physically smaller copy whose outputs equal the
    masked original's; ``residual`` also prunes a ResNet's residual stream.
    """
    from .pruning.structured import remove_units, select_units, unit_scores

    scores = unit_scores(model, criterion, x=x, residual=residual)
    keep = select_units(scores, density, allocation)
    return remove_units(model, keep), keep


__all__ = [
    "__version__",
    "accuracy_metrics",
    "DataError",
    "Dataset",
    "Experiment",
    "LotteryExperiment",
    "LotterySpec",
    "Mask",
    "RunInterrupted",
    "Spec",
    "TrainSpec",
    "UsageError",
    "data",
    "evaluate",
    "from_tensors",
    "load_exported",
    "load_model",
    "lottery",
    "run_on_module",
    "model_density",
    "models",
    "prunable_weights",
    "prune",
    "random_mask",
    "random_reinit",
    "reshuffle",
    "rewind",
    "set_prunable",
    "shrink",
    "signed_constant",
    "snapshot",
    "train",
]
