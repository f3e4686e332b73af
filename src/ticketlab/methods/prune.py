"""One-shot pruning, at initialisation or after training, then training the pruned network.

Per replicate:

- ``when="init"``: score the freshly initialised network, keep ``density`` of
  its weights (spread by ``allocation``), train the pruned network from its
  initial weights for T steps (level 1, variant = criterion name);
- ``when="trained"``: train the dense network (level 0, variant ``dense``),
  score the trained network (the trained-vs-init criteria of Zhou et al. 2019
  compare it with the initial weights), then train the pruned network as the
  lottery protocol says (``rewind`` to step k, ``finetune`` or ``lr-rewind``).

The run store, the variants and the training loop are the lottery's
(:class:`~ticketlab.methods.lottery.Experiment`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment
from ..masks import Mask
from ..protocols import random_mask, random_reinit, snapshot
from ..pruning.allocation import ALLOCATIONS, canonical_allocation, explicit_densities, select
from ..pruning.criteria import (
    CRITERIA,
    GATE_GRANULARITY,
    HESSIAN,
    Context,
    compensate_bias,
    needs_trained,
    score,
)
from ..runs import load_state, save_state
from ..spec import Spec, normalize_target

WHEN = ("init", "trained")
# sanity checks of pruning at initialisation (Su et al. 2020, Frankle et al. 2021)
PRUNE_CONTROLS = ("shuffle", "reinit", "invert")


@dataclass(frozen=True)
class PruneSpec(Spec):
    """Knobs of one-shot pruning (``ticketlab prune``) on top of :class:`Spec`.

    The target is ``density`` or ``sparsity`` (one of them; a sparsity is stored
    as the density 1 - S so both spell the same run).
    """

    SETUP = (
        "Lee et al. 2019 (SNIP), LeNet-300-100: SGD 0.1, momentum 0.9, batch 100, "
        "weight decay 5e-4, Glorot init; their x0.1 step every 25K iterations is left to "
        "--schedule step"
    )

    method: str = "prune"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 100
    weight_decay: float = 5e-4
    density: float | None = None
    sparsity: float | None = None
    allocation: str = "global"
    when: str = "init"
    score_batches: int = 1
    score_batch_size: int | None = None  # None: batch_size
    # per-criterion options
    synflow_rounds: int = 100
    synflow_double: bool = False
    grasp_temperature: float = 200.0
    grasp_samples_per_class: int = 10
    hessian: str = "hutchinson"
    hessian_probes: int = 10
    gates_granularity: str = "weight"
    gates_steps: int = 200
    gates_lr: float = 0.1
    gates_lambda: float = 0.5
    # per-layer densities of their own, "NAME=D" (NAME: first, output, a layer name);
    # the other layers share what is left of the target
    layer_density: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        normalize_target(self)
        object.__setattr__(self, "allocation", canonical_allocation(self.allocation))
        object.__setattr__(self, "layer_density", tuple(self.layer_density))
        # the lottery's controls are checked by Spec; prune has its own set
        controls = tuple(self.controls)
        object.__setattr__(self, "controls", ())
        super().__post_init__()
        object.__setattr__(self, "controls", controls)
        for c in controls:
            if c not in PRUNE_CONTROLS:
                raise UsageError(f"unknown control '{c}'; choose from: {', '.join(PRUNE_CONTROLS)}")
        if self.when not in WHEN:
            raise UsageError(f"unknown --when '{self.when}'; choose from: {', '.join(WHEN)}")
        if self.when == "init" and needs_trained(self.criterion):
            raise UsageError(
                f"criterion '{self.criterion}' compares trained with initial weights; "
                "use --when trained"
            )
        if self.hessian not in HESSIAN:
            raise UsageError(f"unknown hessian '{self.hessian}'; choose from: {', '.join(HESSIAN)}")
        if self.gates_granularity not in GATE_GRANULARITY:
            raise UsageError(
                f"unknown gates-granularity '{self.gates_granularity}'; "
                f"choose from: {', '.join(GATE_GRANULARITY)}"
            )
        for name in ("score_batches", "synflow_rounds", "grasp_samples_per_class", "gates_steps"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be >= 1")
        if self.hessian_probes < 1:
            raise UsageError("hessian-probes must be >= 1")
        if getattr(CRITERIA[self.criterion], "needs_training", False):
            raise UsageError(
                f"criterion '{self.criterion}' is accumulated during training; "
                "use ticketlab gradual"
            )
        if self.score_batch_size is not None and self.score_batch_size < 1:
            raise UsageError("score-batch-size must be >= 1")
        if self.grasp_temperature <= 0:
            raise UsageError("grasp-temperature must be positive")
        if self.gates_lr <= 0:
            raise UsageError("gates-lr must be positive")
        if self.gates_lambda < 0:
            raise UsageError("gates-lambda must be >= 0")


class PruneExperiment(Experiment):
    """One-shot pruning bound to its run directory ``<runs-dir>/prune-<hash12>``."""

    def __init__(self, spec: PruneSpec, data=None, model_fn=None, model_id=None):
        if spec.density is None:
            raise UsageError("give the target: --sparsity S or --density D")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        # bad layer names or an unreachable target fail before anything is written
        self.explicit = explicit_densities(spec.layer_density, probe) or None
        select(
            {n: torch.zeros(m.shape) for n, m in Mask.dense(probe).items()},
            Mask.dense(probe),
            spec.density,
            spec.allocation,
            spec.dense_layers,
            explicit=self.explicit,
            model=probe,
        )

    def context(self, r: int, init_state: dict) -> Context:
        spec = self.spec
        return Context(
            data=self.data,
            batches=spec.score_batches,
            batch_size=spec.score_batch_size or spec.batch_size,
            generator=torch.Generator().manual_seed(self.seed(r, "prune/score")),
            init_state=init_state,
            density=spec.density,
            options={
                "rounds": spec.synflow_rounds,
                "double": spec.synflow_double,
                "temperature": spec.grasp_temperature,
                "samples_per_class": spec.grasp_samples_per_class,
                "hessian": spec.hessian,
                "probes": spec.hessian_probes,
                "gates_granularity": spec.gates_granularity,
                "gates_steps": spec.gates_steps,
                "gates_lr": spec.gates_lr,
                "gates_lambda": spec.gates_lambda,
            },
        )

    def score_mask(self, model: nn.Module, r: int, init_state: dict, invert: bool = False) -> Mask:
        """The pruned mask; with ``variance`` the input means are kept in ``self.means``.

        ``invert`` scores for the lowest (the ``invert`` control): the same allocation
        keeps the lowest-scored weights instead; SynFlow inverts inside each round.
        """
        spec = self.spec
        dense = Mask.dense(model)
        ctx = self.context(r, init_state)
        scores = score(spec.criterion, model, dense, ctx, invert=invert)
        if not invert:
            self.means = ctx.options.get("input_means")
        return select(
            scores,
            dense,
            spec.density,
            spec.allocation,
            spec.dense_layers,
            explicit=self.explicit,
            model=model,
        )

    def compensated(self, model: nn.Module, start: dict, mask: Mask) -> dict:
        """``start`` with the removed weights' mean contributions moved into the biases
        (criterion ``variance``: :func:`~ticketlab.pruning.criteria.compensate_bias`)."""
        scored = snapshot(model)
        model.load_state_dict(start)
        compensate_bias(model, Mask.dense(model), mask, self.means)
        out = snapshot(model)
        model.load_state_dict(scored)
        return out

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        model = self.model_fn(self.seed(r, "init"))
        init_state = snapshot(model)
        vdir = rdir / "level-1" / spec.criterion
        phase = (0, res.steps, None)
        start = init_state
        if spec.when == "trained":
            rewind_path = rdir / "rewind.safetensors"

            def save_rewind(step: int, m: nn.Module) -> None:
                if not rewind_path.exists():
                    save_state(rewind_path, snapshot(m))

            ddir = rdir / "level-0" / "dense"
            self._variant(
                model,
                ddir,
                r,
                0,
                "dense",
                start_state=init_state,
                mask=Mask.dense(model),
                phase=(0, res.steps, None),
                snapshot_steps={res.rewind},
                on_snapshot=save_rewind,
                progress=progress,
            )
            trained = load_state(ddir / "weights_end.safetensors")
            model.load_state_dict(trained)
            phase = self._phase(1)
            start = load_state(rewind_path) if spec.protocol == "rewind" else trained
        scored = snapshot(model)  # what the criterion scores: the initial or trained network
        mask_path = vdir / "mask.safetensors"
        if (vdir / "result.json").exists():
            mask = Mask.load(mask_path)
        else:
            cstart = start
            if mask_path.exists():
                mask = Mask.load(mask_path)
                if spec.criterion == "variance" and (vdir / "weights_start.safetensors").exists():
                    cstart = load_state(vdir / "weights_start.safetensors")  # compensated already
            else:
                mask = self.score_mask(model, r, init_state)
                if spec.criterion == "variance":
                    cstart = self.compensated(model, start, mask)
            self._variant(model, vdir, r, 1, spec.criterion, cstart, mask, phase, progress=progress)
        self._controls(model, rdir / "level-1", r, scored, init_state, start, mask, phase, progress)

    def _controls(self, model, ldir, r, scored, init_state, start, mask, phase, progress) -> None:
        """The sanity-check variants, each trained like the criterion's ticket.

        ``shuffle``: the mask permuted within each layer (same per-layer counts);
        ``reinit``: the same mask on freshly initialised weights; ``invert``: the
        same allocation keeping the lowest scores. They start from the criterion's
        uncompensated weights (no ``variance`` bias compensation).
        """
        spec = self.spec
        for control in spec.controls:
            cdir = ldir / control
            if (cdir / "result.json").exists():
                continue
            cseed = self.seed(r, f"{control}/1")
            cmask, cstart = mask, start
            if control == "shuffle":
                cmask = random_mask(mask, cseed)
            elif control == "reinit":
                cstart = random_reinit(model, spec.init, cseed)
            elif control == "invert":
                if (cdir / "mask.safetensors").exists():
                    cmask = Mask.load(cdir / "mask.safetensors")
                else:
                    model.load_state_dict(scored)
                    cmask = self.score_mask(model, r, init_state, invert=True)
            self._variant(model, cdir, r, 1, control, cstart, cmask, phase, progress=progress)


def prune_experiment(model: nn.Module, data, spec: PruneSpec, progress=None) -> list[dict]:
    """One-shot pruning of a user's own module (see :func:`ticketlab.methods.lottery.lottery`)."""
    from ..experiment import run_on_module

    return run_on_module(PruneExperiment, model, data, spec, progress)


__all__ = ["ALLOCATIONS", "PRUNE_CONTROLS", "PruneExperiment", "PruneSpec", "prune_experiment"]
