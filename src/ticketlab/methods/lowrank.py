"""Low-rank replacement: each Linear and Conv weight replaced by a product of two thinner
layers (``W ~ B A`` of rank r), then fine-tuned, or trained from scratch.

Per replicate:

- level 0, variant ``dense``: the network trained for T steps (skipped with
  ``from_scratch``);
- level 1, variant ``lowrank``: every Linear and ungrouped Conv layer (but those in
  ``dense_layers``: ``first``, ``output`` or names) replaced by its truncated SVD at rank
  ``ceil(rank_fraction * min(out, fan-in))`` (:mod:`ticketlab.models.lowrank`: a conv
  becomes a conv with r output channels and the original kernel, then a 1x1 conv), then
  fine-tuned for ``retrain_steps`` (default T) at a fixed LR, ``finetune_lr`` or by
  default the schedule's final LR but at least 1/100 of the base LR (as ``structured``
  fine-tunes), the data order continuing after step T;
- with ``from_scratch``, instead, level 1 variant ``scratch``: the factorised
  architecture initialised with ``init`` and trained for T steps on the schedule.

Rows carry ``params`` (all parameters of the network), ``macs`` (multiply-adds of one
example), ``rank_fraction``, ``density`` (the network's prunable weights over the dense
network's, so that low-rank rows sit on one axis with pruned ones), ``svd_energy`` (the
mean fraction of squared singular values kept per layer) and
``test_accuracy_before_finetune`` (the factorised network straight after the SVD).
:func:`ticketlab.load_model` rebuilds the factorised network from the run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment
from ..masks import Mask, layer_kinds
from ..metrics import multiply_adds, parameter_count
from ..models import initialize
from ..models.lowrank import factorise, layer_names, rank_for
from ..protocols import snapshot
from ..pruning.allocation import dense_names
from ..runs import load_state
from ..spec import Spec
from ..train import evaluate, lr_at

COLUMNS = ["rank_fraction", "params", "macs", "svd_energy", "test_accuracy_before_finetune"]


@dataclass(frozen=True)
class LowRankSpec(Spec):
    """Knobs of ``ticketlab lowrank`` on top of :class:`Spec`."""

    SETUP = (
        "the dense network's training as in Frankle & Carbin 2019 (LeNet-300-100: Adam "
        "1.2e-3, batch 60); truncated SVD (Eckart-Young) of each trained Linear and conv "
        "(read as out x in*k*k), fine-tuned at the final LR as structured pruning does"
    )

    method: str = "lowrank"
    rank_fraction: float | None = None
    from_scratch: bool = False
    finetune_lr: float | None = None  # None: max(final LR of the schedule, lr / 100)

    def __post_init__(self) -> None:
        super().__post_init__()
        rf = self.rank_fraction
        if rf is not None and (
            isinstance(rf, bool) or not isinstance(rf, (int, float)) or not 0 < rf <= 1
        ):
            raise UsageError(f"rank fraction must be in (0, 1]; got {rf}")
        if self.finetune_lr is not None and not (
            isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0
        ):
            raise UsageError(f"finetune-lr must be positive; got {self.finetune_lr}")


def ranks_at(model: nn.Module, fraction: float, dense=()) -> dict[str, int]:
    """Module name -> rank at ``fraction`` of full rank, for every factorable layer but
    those ``dense`` names (``first``, ``output``, module or parameter names)."""
    names = Mask.dense(model).names()
    skip = {n.rsplit(".", 1)[0] for n in dense_names(names, dense, layer_kinds(model))}
    mods = dict(model.named_modules())
    return {n: rank_for(mods[n], fraction) for n in layer_names(model, skip)}


def low_rank(model: nn.Module, fraction: float, dense=()) -> dict[str, float]:
    """Replace the layers of a trained ``model`` (any ``nn.Module``) by truncated SVD
    factors at ``fraction`` of full rank, in place: the Python API. Returns each layer's
    kept energy."""
    return factorise(model, ranks_at(model, fraction, dense), weights=True)


class LowRankExperiment(Experiment):
    """A low-rank run bound to ``<runs-dir>/lowrank-<hash12>``."""

    def __init__(self, spec: LowRankSpec, data=None, model_fn=None, model_id=None):
        if spec.rank_fraction is None:
            raise UsageError("give the rank: --rank-fraction R (a fraction of full rank)")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        self.ranks = ranks_at(probe, spec.rank_fraction, spec.dense_layers)
        if not self.ranks:
            raise UsageError(f"model '{spec.model}' has no Linear or Conv layer to factorise")
        self.dense_weights = Mask.dense(probe).num_total()
        self.dense_params = parameter_count(probe)
        self.dense_macs = multiply_adds(probe, self.data.input_shape)

    def finetune_lr(self) -> float:
        spec = self.spec
        return spec.finetune_lr or max(lr_at(self.res.steps - 1, spec, self.res), spec.lr / 100)

    def _describe(self, model: nn.Module, energy: dict[str, float]) -> dict:
        weights = Mask.dense(model).num_total()
        return {
            "rank_fraction": self.spec.rank_fraction,
            "params": parameter_count(model),
            "macs": multiply_adds(model, self.data.input_shape),
            "svd_energy": sum(energy.values()) / len(energy),
            "density": weights / self.dense_weights,
            "compression_ratio": self.dense_params / parameter_count(model),
        }

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        ldir = rdir / "level-1"
        if spec.from_scratch:
            model = self.model_fn(self.seed(r, "init"))
            energy = factorise(model, self.ranks, weights=False)
            initialize(model, spec.init, torch.Generator().manual_seed(self.seed(r, "init")))
            extra = self._describe(model, energy)
            extra.update(svd_energy=None, test_accuracy_before_finetune=None)
            extra["flops_speedup"] = self.dense_macs / extra["macs"]
            self._variant(
                model, ldir / "scratch", r, 1, "scratch", snapshot(model), Mask.dense(model),
                (0, res.steps, None), progress=progress, extra=extra,
            )  # fmt: skip
            return
        model = self.model_fn(self.seed(r, "init"))
        ddir = rdir / "level-0" / "dense"
        self._variant(
            model, ddir, r, 0, "dense", snapshot(model), Mask.dense(model),
            (0, res.steps, None), progress=progress,
            extra={"rank_fraction": 1.0, "params": self.dense_params, "macs": self.dense_macs},
        )  # fmt: skip
        model.load_state_dict(load_state(ddir / "weights_end.safetensors"))
        small = copy.deepcopy(model)
        energy = factorise(small, self.ranks, weights=True)
        extra = self._describe(small, energy)
        extra["flops_speedup"] = self.dense_macs / extra["macs"]
        _, acc = evaluate(small, self.data.x_test, self.data.y_test, spec.eval_batch_size)
        extra["test_accuracy_before_finetune"] = acc
        if math.isnan(acc):
            extra["test_accuracy_before_finetune"] = None
        self._variant(
            small, ldir / "lowrank", r, 1, "lowrank", snapshot(small), Mask.dense(small),
            (res.steps, res.steps + res.retrain_steps, self.finetune_lr()),
            progress=progress, extra=extra,
        )  # fmt: skip


def lowrank(model: nn.Module, data, spec: LowRankSpec, progress=None) -> list[dict]:
    """A low-rank run on a user's own module (later replicates re-initialise it)."""
    from ..experiment import run_on_module

    return run_on_module(LowRankExperiment, model, data, spec, progress)


__all__ = ["COLUMNS", "LowRankExperiment", "LowRankSpec", "low_rank", "lowrank", "ranks_at"]
