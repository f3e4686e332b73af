"""Gradual pruning during training (Zhu & Gupta 2017), by magnitude, any data-free
criterion, or movement (Sanh et al. 2020).

The target sparsity follows the cubic schedule of :mod:`ticketlab.pruning.schedules`,

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3,

updated every Δt steps from t0 to t_end = t0 + n Δt (``--start``, ``--end``,
``--frequency``), through an ``after_step`` callback of the training loop:

- :class:`GradualPruner` scores the weights (``--criterion``, data-free), keeps
  the top ``1 - s_t`` spread by ``--allocation`` among the weights still kept,
  and calls ``keeper.set_mask``: pruned weights are zeroed in place and never
  come back;
- :class:`MovementPruner` (``--criterion movement``) accumulates
  S = -Σ_t g_t · w_t with g the gradient of the masked weight, and masks in the
  forward pass (:func:`ticketlab.masks.forward.attach` + ``set_mask``): the dense
  values stay behind the mask, and a weight whose score rises comes back.

One replicate trains one network for T steps from its initialisation (level 1,
variant = criterion). Its directory holds ``mask_end.safetensors`` (the final
mask), ``weights_end`` (masked) and, for movement, ``weights_dense`` (the
values behind the mask). The schedule's state (mask, movement scores) is saved
at each mask update, so a resumed run goes on from the last update (movement
scores accumulated since then are lost).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density
from ..masks.forward import attach
from ..protocols import rewind, snapshot
from ..pruning.allocation import canonical_allocation, select
from ..pruning.criteria import CRITERIA, Context
from ..pruning.schedules import cubic_sparsity, pruning_steps
from ..runs import RESULT_COLUMNS, atomic_path, save_state, write_json
from ..spec import Spec, check_step_string, normalize_target, parse_steps
from ..train import train


@dataclass(frozen=True)
class GradualSpec(Spec):
    """Knobs of gradual pruning (``ticketlab gradual``) on top of :class:`Spec`.

    The final target is ``density`` or ``sparsity`` (stored as the density);
    ``initial_sparsity`` is s_i; ``start``, ``end`` and ``frequency`` are step
    strings (t0, t0 + n Δt, Δt).
    """

    SETUP = (
        "Zhu & Gupta 2017: cubic schedule from step 0 to 3/4 of training, a mask update every "
        "100 steps, each layer pruned to s_t (Sanh et al.: top v per matrix); training as the "
        "lottery's (Frankle & Carbin LeNet: Adam 1.2e-3, batch 60)"
    )

    method: str = "gradual"
    density: float | None = None
    sparsity: float | None = None
    initial_sparsity: float = 0.0
    start: str = "0it"
    end: str | None = None  # None: the last update step in the first 3/4 of training
    frequency: str = "100it"
    # Zhu & Gupta prune every layer to s_t; Sanh et al. keep the top v per matrix
    allocation: str = "layerwise"

    def __post_init__(self) -> None:
        normalize_target(self)
        s_i = self.initial_sparsity
        if not isinstance(s_i, (int, float)) or not 0.0 <= float(s_i) < 1.0:
            raise UsageError(f"initial sparsity must be in [0, 1); got {s_i}")
        if self.density is not None and s_i > 1.0 - self.density:
            raise UsageError(
                f"initial sparsity {s_i} exceeds the final sparsity {1.0 - self.density:.6g}"
            )
        object.__setattr__(self, "allocation", canonical_allocation(self.allocation))
        for name in ("start", "end", "frequency"):
            check_step_string(getattr(self, name), name)
        super().__post_init__()


class GradualPruner:
    """``after_step`` callback: at the schedule's steps, prune to s_t by a no-data criterion.

    ``steps`` are the mask-update steps t0, t0 + Δt, ..., t0 + n Δt, counted in
    steps taken (the callback after step index i sees t = i + 1). Weights pruned
    earlier stay pruned (scores of removed weights are -inf in :func:`select`).
    """

    def __init__(
        self,
        criterion: str,
        density: float,
        initial_sparsity: float,
        steps: list[int],
        allocation: str = "layerwise",
        dense_layers=(),
        generator: torch.Generator | None = None,
        state_path: Path | None = None,
    ):
        if criterion not in CRITERIA:
            raise UsageError(f"unknown criterion '{criterion}'")
        self.criterion = criterion
        self.final = 1.0 - density
        self.initial = initial_sparsity
        self.steps = list(steps)
        self.points = set(self.steps)
        self.n = max(len(self.steps) - 1, 1)
        self.frequency = self.steps[1] - self.steps[0] if len(self.steps) > 1 else 1
        self.allocation = allocation
        self.dense_layers = tuple(dense_layers)
        self.generator = generator
        self.state_path = state_path
        self.mask: Mask | None = None

    def sparsity_at(self, t: int) -> float:
        if len(self.steps) == 1:
            return self.final
        return cubic_sparsity(t, self.final, self.initial, self.steps[0], self.n, self.frequency)

    def context(self) -> Context:
        return Context(generator=self.generator)

    def reference(self, model: nn.Module) -> Mask:
        """The mask new masks are selected within: the current one (nothing comes back)."""
        return self.mask if self.mask is not None else Mask.dense(model)

    def mask_at(self, t: int, model: nn.Module) -> Mask | None:
        """The mask for step t (None: still dense)."""
        s = self.sparsity_at(t)
        if s <= 0.0:
            return None
        ref = self.reference(model)
        scores = CRITERIA[self.criterion](model, Mask.dense(model), self.context())
        return select(scores, ref, 1.0 - s, self.allocation, self.dense_layers, model=model)

    def initial_mask(self, model: nn.Module) -> Mask | None:
        """With t0 = 0 the first update (to s_i) happens before training."""
        if self.steps[0] == 0:
            self.mask = self.mask_at(0, model)
        return self.mask

    def after_step(self, step, model, optimizer, keeper, x, y) -> None:
        t = step + 1
        if t not in self.points:
            return
        new = self.mask_at(t, model)
        if new is None:
            return
        self.mask = new
        self.apply(keeper)
        self.save(t)

    def apply(self, keeper) -> None:
        keeper.set_mask(self.mask)

    # state across a resume --------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        if self.mask is None:
            return {}
        return {f"mask/{k}": v.to(torch.uint8) for k, v in self.mask.items()}

    def save(self, t: int) -> None:
        if self.state_path is None:
            return
        state = {k: v.cpu().contiguous() for k, v in self.state().items()}  # resumes anywhere
        state["step"] = torch.tensor([t])
        with atomic_path(self.state_path) as tmp:
            save_file(state, tmp)

    def load(self) -> bool:
        if self.state_path is None or not self.state_path.exists():
            return False
        state = load_file(str(self.state_path))
        masks = {k[5:]: v.bool() for k, v in state.items() if k.startswith("mask/")}
        self.mask = Mask(masks) if masks else None
        self.restore(state)
        return True

    def restore(self, state: dict) -> None:
        pass


class MovementPruner(GradualPruner):
    """Movement pruning (Sanh et al. 2020, hard variant) under the cubic schedule.

    S_ij = -Σ_t (∂L/∂W'_ij)^(t) W_ij^(t), W' = W ⊙ M: each layer multiplies by a
    float copy of its mask that requires grad, so after backward its gradient is
    ∂L/∂M = (∂L/∂W') ⊙ W, the per-step score increment (with a minus), for kept
    and pruned weights alike; the weights themselves get (∂L/∂W') ⊙ M as usual.
    At each update the top ``1 - s_t`` scores over all weights are kept (a pruned
    weight comes back if its score rose), through the forward mask's ``set_mask``;
    the weights are never zeroed.
    """

    def __init__(self, model: nn.Module, *args, **kwargs):
        super().__init__("movement", *args, **kwargs)
        self.handle = attach(model)
        self.scores = {
            n: torch.zeros_like(self.handle.weight(n), dtype=torch.float32)
            for n in self.handle.modules
        }
        self.factors: dict[str, torch.Tensor] = {}
        self._set(None)

    def _set(self, mask: Mask | None) -> None:
        if mask is not None:
            self.handle.set_mask(mask)
        self.factors = {}
        for n in self.handle.modules:
            w = self.handle.weight(n)
            f = mask[n] if mask is not None and n in mask else torch.ones(w.shape, dtype=torch.bool)
            self.factors[n] = f.to(device=w.device, dtype=w.dtype).requires_grad_(True)
        self.handle.set_factors(self.factors)

    def reference(self, model: nn.Module) -> Mask:
        return Mask.dense(model)  # every weight competes: pruned ones may return

    def context(self) -> Context:
        return Context(generator=self.generator, options={"movement_scores": self.scores})

    def accumulate(self) -> None:
        for n, f in self.factors.items():
            if f.grad is not None:
                self.scores[n] -= f.grad.detach().float()
                f.grad = None

    def after_step(self, step, model, optimizer, keeper, x, y) -> None:
        self.accumulate()
        super().after_step(step, model, optimizer, keeper, x, y)

    def initial_mask(self, model: nn.Module) -> Mask | None:
        mask = super().initial_mask(model)
        if mask is not None:
            self._set(mask)
        return None  # the training loop's keeper must not zero anything

    def apply(self, keeper) -> None:
        self._set(self.mask)

    def state(self) -> dict[str, torch.Tensor]:
        out = super().state()
        out.update({f"score/{k}": v.detach().cpu() for k, v in self.scores.items()})
        return out

    def restore(self, state: dict) -> None:
        for k in self.scores:
            if f"score/{k}" in state:
                self.scores[k].copy_(state[f"score/{k}"])
        self._set(self.mask)

    def detach(self) -> None:
        self.handle.detach(bake=False)


class GradualExperiment(Experiment):
    """Gradual pruning bound to its run directory ``<runs-dir>/gradual-<hash12>``."""

    def __init__(self, spec: GradualSpec, data=None, model_fn=None, model_id=None):
        if spec.density is None:
            raise UsageError("give the target: --sparsity S or --density D")
        if spec.criterion != "movement" and (
            CRITERIA[spec.criterion].needs_data or CRITERIA[spec.criterion].needs_input
        ):
            raise UsageError(f"criterion '{spec.criterion}' cannot be used by gradual")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        start = parse_steps(spec.start, self.spe, "start")
        freq = parse_steps(spec.frequency, self.spe, "frequency")
        if spec.end is None:  # 3/4 of training, on the update grid: the rest trains the mask
            end = start + (3 * self.res.steps // 4 - start) // freq * freq
            if end <= start:
                raise UsageError(
                    f"no mask update fits before 3/4 of training ({self.res.steps} steps); "
                    "give --end, --start or --every"
                )
        else:
            end = parse_steps(spec.end, self.spe, "end")
        self.points = pruning_steps(start, end, freq)
        if end > self.res.steps:
            raise UsageError(f"--end ({end}) is after the last training step ({self.res.steps})")
        probe = self.model_fn(0)
        dense = Mask.dense(probe)
        select(
            {n: torch.zeros(m.shape) for n, m in dense.items()},
            dense,
            spec.density,
            spec.allocation,
            spec.dense_layers,
            model=probe,
        )

    def pruner(self, model: nn.Module, r: int, state_path: Path | None) -> GradualPruner:
        spec = self.spec
        args = (spec.density, spec.initial_sparsity, self.points, spec.allocation)
        kwargs = {
            "dense_layers": spec.dense_layers,
            "generator": torch.Generator().manual_seed(self.seed(r, "gradual/score")),
            "state_path": state_path,
        }
        if spec.criterion == "movement":
            return MovementPruner(model, *args, **kwargs)
        return GradualPruner(spec.criterion, *args, **kwargs)

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        vdir = self.dir / f"replicate-{r}" / "level-1" / spec.criterion
        if (vdir / "result.json").exists():
            return
        vdir.mkdir(parents=True, exist_ok=True)
        model = self.model_fn(self.seed(r, "init"))
        init_state = snapshot(model)
        rewind(model, init_state)
        if not (vdir / "weights_start.safetensors").exists():
            save_state(vdir / "weights_start.safetensors", init_state)
        cb = self.pruner(model, r, vdir / "gradual_state.safetensors")
        if (vdir / "checkpoint.safetensors").exists() and cb.load():
            mask = cb.mask if spec.criterion != "movement" else None
        else:
            mask = cb.initial_mask(model)
            cb.save(0)
        metrics = train(
            model,
            self.data,
            spec,
            mask,
            start=0,
            end=res.steps,
            data_seed=self.seed(r, "data"),
            aug_seed=self.seed(r, "aug"),
            workdir=vdir,
            progress=progress,
            label=f"rep {r} gradual {spec.criterion} -> {100 * spec.density:.1f}%",
            callbacks=[cb],
            checkpoint_steps=self.points,  # the schedule's state is saved at these
        )
        final = cb.mask if cb.mask is not None else Mask.dense(model)
        if isinstance(cb, MovementPruner):
            cb.detach()
            save_state(vdir / "weights_dense.safetensors", snapshot(model))
            final.apply_(model)
        final.save(vdir / "mask_end.safetensors")
        save_state(vdir / "weights_end.safetensors", snapshot(model), final)
        row = {
            "method": spec.method,
            "replicate": r,
            "level": 1,
            "variant": spec.criterion,
            "density": final.density(),
            "density_all": model_density(model),
            **metrics,
            "status": "done",
        }
        write_json(vdir / "result.json", row)
        (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)


__all__ = ["GradualExperiment", "GradualPruner", "GradualSpec", "MovementPruner"]
