"""Structured pruning with real removal, and the comparison of Liu et al. 2019.

Per replicate:

- level 0 (variant ``dense``): train the dense network for T steps; with
  ``bn-scale`` (network slimming, Liu et al. 2017) an L1 penalty ``s * |γ|`` on
  every BatchNorm scale is added during this training (``slimming_l1``,
  default 1e-4 as the paper uses for VGG);
- score the units (neurons, channels) of the trained network by ``l1``, ``l2``,
  ``bn-scale`` or ``redundancy`` (:mod:`ticketlab.pruning.structured`), keep
  ``density`` of them (``layerwise``: the same fraction of every layer;
  ``global``: one threshold over all layers, the default for ``bn-scale`` as in
  network slimming), and build the physically smaller network. The saved unit
  masks (``level-1/units.safetensors``) rebuild it exactly;
- level 1, variant ``finetune``: the smaller network from the trained weights,
  trained ``retrain_steps`` (default T) at a fixed LR, ``finetune_lr`` or by
  default the schedule's final LR but at least 1/100 of the base LR (Liu et al.
  fine-tune at 0.001 after training at 0.1; a cosine schedule ends near 0,
  which would leave the pruned network as it was cut);
- with ``from_scratch`` (Liu et al. 2019, "Rethinking the value of network
  pruning"): ``scratch-e``, the smaller architecture freshly initialised and
  trained for the same T steps and schedule; ``scratch-b``, the same but for
  T x (dense multiply-adds / pruned multiply-adds) steps, the same training
  FLOPs as the dense network, capped at ``scratch_b_cap`` x T (2, as the
  paper caps the extended budget), with the schedule stretched to match.

Rows of level 1 report, against the original network: ``density`` (kept
prunable weights), ``compression_ratio`` (all parameters over the smaller
network's nonzero ones), ``flops_speedup`` (multiply-adds ratio), and
``unit_density``, ``params``, ``macs`` and ``removal_max_abs_diff``, the largest
output difference between the smaller network and the masked original on a
test batch (it should be float rounding), and ``inference_speedup``, the
measured latency of the original network over the smaller one's on that batch
of 256 (:func:`ticketlab.metrics.inference_speedup`; one process's wall clock,
so it varies between runs).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment
from ..masks import Mask, prunable_weights
from ..metrics import inference_speedup, multiply_adds, parameter_count
from ..models import initialize
from ..protocols import snapshot
from ..pruning.structured import (
    UNIT_ALLOCATIONS,
    BNL1Penalty,
    canonical_unit_criterion,
    expand,
    groups,
    remove_units,
    select_units,
    unit_scores,
)
from ..runs import load_state, read_json
from ..spec import Spec, normalize_target
from ..train import lr_at

STRUCTURED_CRITERIA = ("l1", "l2", "bn-scale", "redundancy")


@dataclass(frozen=True)
class StructuredSpec(Spec):
    """Knobs of ``ticketlab structured`` on top of :class:`Spec`.

    ``density``/``sparsity`` are fractions of *units* (neurons, channels) kept or
    removed; a sparsity is stored as the density 1 - S.
    """

    EXTENDS = frozenset({"from_scratch"})  # the Scratch-E/B variants add to a run

    SETUP = (
        "Li et al. 2017 (L1 norm of units) and Liu et al. 2017 (network slimming: BN scales): "
        "train, remove units, fine-tune; training as the lottery's (Frankle & Carbin LeNet: "
        "Adam 1.2e-3, batch 60) unless set"
    )

    method: str = "structured"
    unit_criterion: str = "l1"
    density: float | None = None
    sparsity: float | None = None
    unit_allocation: str | None = None  # None: global for bn-scale, else layerwise
    slimming_l1: float | None = None  # None: 1e-4 for bn-scale, else 0
    residual: bool = False
    from_scratch: bool = False
    scratch_b_cap: float = 2.0
    score_examples: int = 1000
    finetune_lr: float | None = None  # None: max(final LR of the schedule, lr / 100)

    def __post_init__(self) -> None:
        normalize_target(self)
        super().__post_init__()
        if self.unit_criterion not in STRUCTURED_CRITERIA:
            choices = ", ".join(STRUCTURED_CRITERIA)
            raise UsageError(f"unknown criterion '{self.unit_criterion}'; choose from: {choices}")
        bn = self.unit_criterion == "bn-scale"
        if self.unit_allocation is None:
            object.__setattr__(self, "unit_allocation", "global" if bn else "layerwise")
        if self.unit_allocation not in UNIT_ALLOCATIONS:
            choices = ", ".join(UNIT_ALLOCATIONS)
            raise UsageError(
                f"unknown unit allocation '{self.unit_allocation}'; choose from: {choices}"
            )
        if self.slimming_l1 is None:
            object.__setattr__(self, "slimming_l1", 1e-4 if bn else 0.0)
        if not (isinstance(self.slimming_l1, (int, float)) and self.slimming_l1 >= 0):
            raise UsageError(f"slimming-l1 must be >= 0; got {self.slimming_l1}")
        if not (isinstance(self.scratch_b_cap, (int, float)) and self.scratch_b_cap >= 1):
            raise UsageError(f"scratch-b-cap must be >= 1; got {self.scratch_b_cap}")
        if self.finetune_lr is not None and not (
            isinstance(self.finetune_lr, (int, float)) and self.finetune_lr > 0
        ):
            raise UsageError(f"finetune-lr must be positive; got {self.finetune_lr}")
        if isinstance(self.score_examples, bool) or not (
            isinstance(self.score_examples, int) and self.score_examples >= 2
        ):
            raise UsageError(
                f"score-examples must be a whole number >= 2; got {self.score_examples}"
            )


class StructuredExperiment(Experiment):
    """Structured pruning bound to its run directory ``<runs-dir>/structured-<hash12>``."""

    def __init__(self, spec: StructuredSpec, data=None, model_fn=None, model_id=None):
        if spec.density is None:
            raise UsageError("give the target: --sparsity S or --density D (fractions of units)")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        # a model without removable units, or bn-scale without BatchNorm, fails now
        gs = groups(probe, spec.residual)
        if not gs:
            raise UsageError("the model has no units that can be removed")
        if spec.unit_criterion == "bn-scale":
            unit_scores(probe, "bn", residual=spec.residual)
        self.shape = tuple(self.data.input_shape)
        self.dense_params = parameter_count(probe)
        self.dense_macs = multiply_adds(probe, self.shape)
        self.dense_weights = sum(p.numel() for p in prunable_weights(probe).values())

    def units(self, model: nn.Module, r: int, path) -> dict[str, torch.Tensor]:
        """The unit masks of replicate ``r`` (computed once from the trained model, saved)."""
        if path.exists():
            return dict(Mask.load(path).items())
        spec = self.spec
        x = None
        if spec.unit_criterion == "redundancy":
            gen = torch.Generator().manual_seed(self.seed(r, "structured/examples"))
            n = min(spec.score_examples, len(self.data.x_train))
            x = self.data.x_train[torch.randperm(len(self.data.x_train), generator=gen)[:n]]
        crit = canonical_unit_criterion(spec.unit_criterion)
        scores = unit_scores(model, crit, x=x, residual=spec.residual)
        keep = select_units(scores, spec.density, spec.unit_allocation)
        path.parent.mkdir(parents=True, exist_ok=True)
        Mask(keep).save(path)
        return keep

    def describe(
        self, model: nn.Module, small: nn.Module, keep: dict, speedup: float | None = None
    ) -> dict:
        """Columns of a smaller network, against the original ``model``; ``speedup``, when
        already measured for this network, is reused rather than timed again."""
        masked = copy.deepcopy(model)
        expand(model, keep).apply_(masked)
        dev = next(small.parameters()).device
        x = self.data.x_test[:256].to(dev)
        was = small.training
        small.eval()
        masked.eval()
        with torch.no_grad():
            diff = float((small(x) - masked(x)).abs().max())
        small.train(was)
        if speedup is None:
            speedup = inference_speedup(model, small, x)
        weights = sum(p.numel() for p in prunable_weights(small).values())
        params, macs = parameter_count(small), multiply_adds(small, self.shape)
        kept = sum(int(m.sum()) for m in keep.values())
        total = sum(m.numel() for m in keep.values())
        return {
            "density": weights / self.dense_weights,
            "effective_density": weights / self.dense_weights,
            "unit_density": kept / total,
            "params": params,
            "macs": macs,
            "compression_ratio": self.dense_params / params,
            "flops_speedup": self.dense_macs / macs,
            "removal_max_abs_diff": diff,
            "inference_speedup": speedup,
        }

    def finetune_lr(self) -> float:
        """``finetune_lr``, or the schedule's final LR but at least 1/100 of the base LR."""
        spec = self.spec
        return spec.finetune_lr or max(lr_at(self.res.steps - 1, spec, self.res), spec.lr / 100)

    def _scaled_spec(self, factor: float) -> tuple[StructuredSpec, int]:
        """The spec with the schedule stretched by ``factor`` (Scratch-B), and its steps."""
        res = self.res
        steps = max(1, int(round(res.steps * factor)))
        milestones = tuple(f"{int(round(m * factor))}it" for m in res.milestones)
        warmup = f"{res.warmup}it" if res.warmup else self.spec.warmup
        spec = dataclasses.replace(
            self.spec, steps=f"{steps}it", milestones=milestones, warmup=warmup
        )
        return spec, steps

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        model = self.model_fn(self.seed(r, "init"))
        init_state = snapshot(model)
        ddir = rdir / "level-0" / "dense"
        penalty = [BNL1Penalty(spec.slimming_l1)] if spec.slimming_l1 > 0 else []
        self._variant(
            model,
            ddir,
            r,
            0,
            "dense",
            init_state,
            Mask.dense(model),
            (0, res.steps, None),
            progress=progress,
            callbacks=penalty,
            extra={"unit_density": 1.0, "params": self.dense_params, "macs": self.dense_macs},
        )
        model.load_state_dict(load_state(ddir / "weights_end.safetensors"))
        ldir = rdir / "level-1"
        keep = self.units(model, r, ldir / "units.safetensors")
        small = remove_units(model, keep)
        # a resumed or extended replicate keeps the speedup its fine-tune row recorded,
        # so every row of one network carries the same measurement
        done = ldir / "finetune" / "result.json"
        measured = read_json(done).get("inference_speedup") if done.exists() else None
        extra = self.describe(model, small, keep, measured)
        final_lr = self.finetune_lr()
        self._variant(
            small,
            ldir / "finetune",
            r,
            1,
            "finetune",
            snapshot(small),
            Mask.dense(small),
            (res.steps, res.steps + res.retrain_steps, final_lr),
            progress=progress,
            extra={**extra, "train_steps": res.retrain_steps},
        )
        if not spec.from_scratch:
            return
        fresh = remove_units(self.model_fn(self.seed(r, "scratch")), keep)
        initialize(fresh, spec.init, torch.Generator().manual_seed(self.seed(r, "scratch")))
        factor = min(spec.scratch_b_cap, self.dense_macs / extra["macs"])
        spec_b, steps_b = self._scaled_spec(factor)
        for variant, run_spec, steps in (
            ("scratch-e", None, res.steps),
            ("scratch-b", spec_b, steps_b),
        ):
            net = copy.deepcopy(fresh)
            self._variant(
                net,
                ldir / variant,
                r,
                1,
                variant,
                snapshot(net),
                Mask.dense(net),
                (0, steps, None),
                progress=progress,
                spec=run_spec,
                extra={**extra, "removal_max_abs_diff": None, "train_steps": steps},
            )


def structured_experiment(model: nn.Module, data, spec: StructuredSpec, progress=None):
    """Structured pruning of a user's own module (an ``nn.Sequential`` stack, or a
    registered model class) on ``data``; returns the result rows."""
    from ..experiment import run_on_module

    return run_on_module(StructuredExperiment, model, data, spec, progress)


__all__ = ["StructuredExperiment", "StructuredSpec", "structured_experiment"]
