"""Dynamic sparse training: static sparse, SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

Per replicate: a random sparse mask at density D, spread over layers by
``distribution`` (uniform, ER or ERK), is drawn at initialisation and trained
for T steps (level 1, variant = algorithm). ``static`` keeps it fixed. ``set``
and ``rigl`` update it every ΔT steps until T_end: in each sparse layer they
drop the ``alpha_t * n_active`` active weights of smallest magnitude and grow
as many inactive connections -- at random (SET) or by largest dense-gradient
magnitude on the current batch (RigL) -- so every layer's count is unchanged.
The just-dropped connections are candidates for regrowth: one dropped and
regrown keeps its value and optimizer state; a new one starts at zero with its
optimizer state (momentum, Adam moments) zeroed. The drop fraction follows
``drop_schedule``: ``constant`` (alpha_t = alpha, SET's own, as in Mocanu et al.)
or ``cosine`` (alpha_t = alpha/2 (1 + cos(pi t / T_end)), RigL's own); either
algorithm may take the other's.

Training cost is counted as the RigL paper does (App. H), per example: 3 f_S per
step for static and SET; for RigL, (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) per step
while the mask is updated (the dense gradient, f_D, is computed only at mask
updates) and 3 f_S per step from T_end on, when the mask is fixed. f_S and f_D
are the sparse and dense forward multiply-adds of one example.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DataError, UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density
from ..metrics import forward_flops, layer_macs, train_flops_per_step
from ..protocols import rewind, snapshot
from ..pruning.allocation import (
    DISTRIBUTIONS,
    allocation_of,
    layer_densities,
    random_sparse_mask,
)
from ..runs import RESULT_COLUMNS, atomic_path, save_state, write_json
from ..spec import Spec, normalize_target
from ..train import train

ALGORITHMS = ("static", "set", "rigl")
DROP_SCHEDULES = ("constant", "cosine")
# optimizer state tensors shaped like the parameter, reset for a new connection
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# beside a variant's checkpoint: its mask and grow generator as of its last mask update
DST_STATE = "dst_state.safetensors"


@dataclass(frozen=True)
class DSTSpec(Spec):
    """Knobs of dynamic sparse training (``ticketlab dst``) on top of :class:`Spec`.

    ``sparsity`` is stored as the density ``1 - S``. ``t_end`` is the fraction of
    training after which the mask is frozen; ``first_dense`` keeps the first
    layer dense (the others then make up the difference). ``drop_schedule`` is
    ``constant`` or ``cosine``; None (the default) is the algorithm's own
    (:func:`default_drop_schedule`), and a value equal to it is stored as None, so
    that asking for it by name keeps the run's hash (static has no updates: always None).
    """

    SETUP = (
        "Evci et al. 2020 (RigL), LeNet-300-100 on MNIST (rigl/mnist): SGD 0.2 with Nesterov "
        "momentum 0.9, batch 100, ERK, mask updates every 100 steps, alpha 0.3, Glorot init"
    )

    method: str = "dst"
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    nesterov: bool = True
    batch_size: int = 100
    algorithm: str = "rigl"
    density: float | None = None
    sparsity: float | None = None
    distribution: str = "erk"
    delta_t: int = 100
    alpha: float = 0.3
    t_end: float = 0.75
    first_dense: bool = False
    drop_schedule: str | None = None

    def __post_init__(self) -> None:
        normalize_target(self)
        super().__post_init__()
        if self.algorithm not in ALGORITHMS:
            raise UsageError(
                f"unknown algorithm '{self.algorithm}'; choose from: {', '.join(ALGORITHMS)}"
            )
        if self.distribution not in DISTRIBUTIONS:
            raise UsageError(
                f"unknown distribution '{self.distribution}'; "
                f"choose from: {', '.join(DISTRIBUTIONS)}"
            )
        if isinstance(self.delta_t, bool) or not isinstance(self.delta_t, int):
            raise UsageError(f"delta-t must be a whole number of steps; got {self.delta_t}")
        if self.delta_t < 1:
            raise UsageError(f"delta-t must be >= 1; got {self.delta_t}")
        if not (isinstance(self.alpha, (int, float)) and 0.0 < self.alpha < 1.0):
            raise UsageError(f"alpha must be in (0, 1); got {self.alpha}")
        if not (isinstance(self.t_end, (int, float)) and 0.0 < self.t_end <= 1.0):
            raise UsageError(f"t-end must be a fraction of training in (0, 1]; got {self.t_end}")
        if self.drop_schedule is not None:
            check_drop_schedule(self.drop_schedule)
            # the algorithm's own schedule, or any for static (no updates), is no change
            own = default_drop_schedule(self.algorithm)
            if own is None or self.drop_schedule == own:
                object.__setattr__(self, "drop_schedule", None)

    def resolved_drop_schedule(self) -> str | None:
        """The drop schedule in use: the one asked for, else the algorithm's own."""
        return self.drop_schedule or default_drop_schedule(self.algorithm)


# masks and schedules ---------------------------------------------------------------------------


def default_drop_schedule(algorithm: str) -> str | None:
    """The drop schedule an algorithm's paper uses: cosine for RigL, constant for SET."""
    return {"rigl": "cosine", "set": "constant"}.get(algorithm)


def check_drop_schedule(schedule: str) -> None:
    if schedule not in DROP_SCHEDULES:
        raise UsageError(
            f"unknown drop schedule '{schedule}'; choose from: {', '.join(DROP_SCHEDULES)}"
        )


def drop_fraction(t: int, alpha: float, t_end: int, cosine: bool = True) -> float:
    """alpha_t: alpha/2 (1 + cos(pi t / T_end)) with ``cosine``, else alpha; 0 from T_end."""
    if t >= t_end:
        return 0.0
    if not cosine:
        return alpha
    return alpha / 2.0 * (1.0 + math.cos(math.pi * t / t_end))


@torch.no_grad()
def _reset_state(optimizer: torch.optim.Optimizer, p: torch.Tensor, where) -> None:
    """Zero the optimizer state of ``p`` at ``where`` (a boolean mask or an index tuple)."""
    state = optimizer.state.get(p, {})
    for key in STATE_KEYS:
        buf = state.get(key)
        if torch.is_tensor(buf) and buf.shape == p.shape:
            buf[where] = 0


def dense_gradients(model: nn.Module, names, x, y) -> dict[str, torch.Tensor]:
    """The gradient of the loss on (x, y) w.r.t. each named weight: dense, though pruned ones are 0.

    The parameters' ``.grad`` are cleared afterwards (the loop's next step recomputes them).
    """
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, [params[n] for n in names])
    return {n: g.detach() for n, g in zip(names, grads)}


def _pick(values: torch.Tensor, k: int, largest: bool, prefilter: bool = True) -> torch.Tensor:
    """Positions of the ``k`` smallest (or largest) of 1-D ``values``, ties to lower positions.

    The same set as the first ``k`` of a stable ``argsort`` (descending for ``largest``),
    found by an unsorted ``topk`` instead of a full sort; returned in no set order.
    """
    n = values.numel()
    if k >= n:
        return torch.arange(n, device=values.device)
    if prefilter and n >= 16 * k and n >= 4096:
        # few of many (growing into a sparse layer): a bound from a strided sample keeps
        # some 2k candidates for the top-k; exact whenever at least k values pass it, as
        # then every one of the k (and every tie of the k-th) is among them
        sample = values[:: n // (4 * k)]
        j = min(2 * k * sample.numel() // n + 16, sample.numel())
        bound = torch.topk(sample, j, largest=largest, sorted=False).values
        bound = bound.min() if largest else bound.max()
        keep = (values >= bound if largest else values <= bound).nonzero().flatten()
        if k <= keep.numel() <= n // 2:
            return keep[_pick(values[keep], k, largest, prefilter=False)]
    top, idx = torch.topk(values, k, largest=largest, sorted=False)
    thr = top.min() if largest else top.max()  # the k-th value
    # topk breaks ties at the k-th value in no set order; if all of them made it, the set is
    # exact, else take those beyond it and the tied ones of lowest position
    if int((values == thr).sum()) == int((top == thr).sum()):
        return idx
    chosen = values > thr if largest else values < thr
    short = k - int(chosen.sum())
    chosen[(values == thr).nonzero().flatten()[:short]] = True
    return chosen.nonzero().flatten()


@torch.no_grad()
def update_mask(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    mask: Mask,
    fraction: float,
    grow: str,
    grads: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    skip: frozenset | set = frozenset(),
) -> tuple[Mask, dict[str, dict]]:
    """One drop/grow update of every sparse layer; returns the new mask and per-layer counts.

    Drops ``round(fraction * n_active)`` active weights of smallest magnitude,
    then grows as many among the inactive ones (the just-dropped included) by
    ``grow``: ``"random"`` or ``"gradient"`` (largest |grads|). Grown
    connections that were not active before are set to 0 and their optimizer
    state is zeroed; so is the state of dropped ones that were not regrown.
    """
    params = dict(model.named_parameters())
    new_masks, stats = {}, {}
    for name, old in mask.items():
        n_active = int(old.sum())
        if name in skip or n_active == old.numel():
            new_masks[name] = old
            continue
        k = int(round(fraction * n_active))
        p = params[name]
        flat_old = old.flatten().to(p.device)
        if k == 0:
            new_masks[name] = old
            stats[name] = {"active": n_active, "dropped": 0, "moved": 0}
            continue
        # drop the k active weights of smallest magnitude, grow the k inactive ones of largest
        # score; ties go to the lower index (as a stable sort would), and only the candidates
        # are searched: a selection, not a sort of the whole layer
        active = flat_old.nonzero().flatten()
        drop = active[_pick(p.detach().abs().flatten()[active], k, largest=False)]
        after_drop = flat_old.clone()
        after_drop[drop] = False
        if grow == "gradient":
            score = grads[name].abs().flatten()
        else:
            score = torch.rand(old.numel(), generator=generator, dtype=torch.double).to(p.device)
        inactive = (~after_drop).nonzero().flatten()
        grown = inactive[_pick(score[inactive], k, largest=True)]
        flat_new = after_drop  # after_drop is not used again
        flat_new[grown] = True
        # only the 2k dropped and grown positions can change: work on their indices
        born = grown[~flat_old[grown]]
        changed = torch.cat([born, drop[~flat_new[drop]]])
        where = torch.unravel_index(changed, p.shape)
        p[where] = 0.0
        if optimizer is not None:
            _reset_state(optimizer, p, where)
        new_masks[name] = flat_new.view_as(old).to(old.device)
        stats[name] = {"active": n_active, "dropped": k, "moved": born.numel()}
    return Mask({n: new_masks[n] for n in mask.names()}), stats


class DSTUpdater:
    """The training-loop callback that updates the mask every ΔT steps until T_end.

    ``t`` (the steps taken) is ``step + 1``; an update happens when ``t`` is a
    multiple of ΔT and ``t < T_end``; it drops the fraction ``alpha_t`` that ``schedule``
    gives (``constant`` or ``cosine``; None: the algorithm's own). Each update appends one
    line to ``log`` and, with ``state``, rewrites that file (mask, grow generator, ``t``) so
    that a run resumed from the training checkpoint continues with the mask it had (see
    :meth:`restore`).
    """

    def __init__(
        self,
        algorithm: str,
        mask: Mask,
        delta_t: int,
        alpha: float,
        t_end: int,
        skip=frozenset(),
        generator: torch.Generator | None = None,
        log: Path | None = None,
        state: Path | None = None,
        schedule: str | None = None,
    ):
        if algorithm not in ("set", "rigl"):
            raise UsageError(f"no mask updates for algorithm '{algorithm}'")
        schedule = schedule or default_drop_schedule(algorithm)
        check_drop_schedule(schedule)
        self.algorithm = algorithm
        self.schedule = schedule
        self.mask = mask
        self.delta_t, self.alpha, self.t_end = delta_t, alpha, t_end
        self.skip = frozenset(skip)
        self.generator = generator or torch.Generator()
        self.log = log
        self.state = Path(state) if state is not None else None
        self.updates: list[dict] = []
        # the sparse layers RigL needs dense gradients of: updates keep every layer's count,
        # so this is fixed
        self.sparse = [n for n, m in mask.items() if n not in self.skip and not bool(m.all())]

    def due(self, t: int) -> bool:
        return t % self.delta_t == 0 and t < self.t_end

    def dense_view(self, step: int) -> bool:
        """Whether :meth:`after_step` at ``step`` needs the dense model (a mask update).

        Between updates the training loop may run the sparse layers on CSR kernels
        (``--kernels``); at an update it writes the kept values and optimizer state back
        into the dense model and optimizer, runs the update on them, and rebuilds the CSR
        layers from the new mask."""
        return self.due(step + 1)

    def after_step(self, step: int, model, optimizer, keeper, x, y) -> None:
        t = step + 1
        if not self.due(t):
            return
        rigl = self.algorithm == "rigl"
        frac = drop_fraction(t, self.alpha, self.t_end, cosine=self.schedule == "cosine")
        grads = None
        if rigl:
            grads = dense_gradients(model, self.sparse, x, y)
        self.mask, stats = update_mask(
            model,
            optimizer,
            self.mask,
            frac,
            "gradient" if rigl else "random",
            grads,
            self.generator,
            self.skip,
        )
        keeper.set_mask(self.mask)
        row = {
            "step": t,
            "alpha_t": frac,
            "moved": sum(s["moved"] for s in stats.values()),
            "layers": stats,
        }
        self.updates.append(row)
        if self.log is not None:
            with open(self.log, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.state is not None:
            self.save_state(self.state, t)

    # resume ----------------------------------------------------------------------------------

    def save_state(self, path: Path, step: int) -> None:
        """Write the mask and the grow generator as of ``step`` steps (atomically)."""
        # on the CPU: a state written beside a GPU run resumes on any device
        tensors = {f"mask/{n}": m.to("cpu", torch.uint8).contiguous() for n, m in self.mask.items()}
        tensors["generator"] = self.generator.get_state()
        meta = {"step": step, "order": self.mask.names()}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata={"ticketlab": json.dumps(meta)})

    def restore(self, path: Path, step: int) -> bool:
        """Continue from ``step`` steps (a checkpoint's): load the saved mask and generator.

        With no state saved (no update yet), the updater keeps its initial mask. Returns
        False, restoring nothing, when the saved state is of a later step than ``step``
        (killed after an update, before the next checkpoint): the run must start again.
        Update rows of later steps are dropped, from ``updates`` and the log file.
        """
        path = Path(path)
        rows = []
        if self.log is not None and self.log.exists():
            for line in self.log.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if row["step"] <= step:
                    rows.append(row)
        if path.exists():
            try:
                tensors = load_file(str(path))
                with safe_open(str(path), "pt") as f:
                    meta = json.loads(f.metadata()["ticketlab"])
            except Exception as exc:
                raise DataError(f"DST state {path} is corrupt: {exc}") from None
            if meta["step"] > step or (rows and rows[-1]["step"] != meta["step"]):
                return False
            self.mask = Mask({n: tensors[f"mask/{n}"].to(torch.bool) for n in meta["order"]})
            self.generator.set_state(tensors["generator"])
        elif rows:
            return False  # updates were made but their mask is lost
        self.updates = rows
        if self.log is not None:
            with atomic_path(self.log) as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows)
        return True


def train_flops_per_example(
    algorithm: str, f_s: float, f_d: float, delta_t: int, steps: int, t_end: int
) -> float:
    """Training multiply-adds of one example over ``steps`` steps (RigL paper, App. H).

    RigL pays for a dense gradient only at its mask updates, which stop at step
    ``t_end``: the paper's per-step cost (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) for the
    first ``t_end`` steps, 3 f_S for the rest. Static and SET: 3 f_S every step.
    """
    updating = min(max(int(t_end), 0), steps) if algorithm == "rigl" else 0
    sparse_step = train_flops_per_step("static", f_s, f_d)
    update_step = train_flops_per_step(algorithm, f_s, f_d, delta_t)
    return updating * update_step + (steps - updating) * sparse_step


def checkpoint_step(path: Path) -> int:
    """The step a training checkpoint (``ticketlab.train``'s) was written at."""
    try:
        with safe_open(str(path), "pt") as f:
            return int(json.loads(f.metadata()["ticketlab"])["step"])
    except Exception as exc:
        raise DataError(f"checkpoint {path} is corrupt: {exc}") from None


# the experiment --------------------------------------------------------------------------------


class DSTExperiment(Experiment):
    """Dynamic sparse training bound to its run directory ``<runs-dir>/dst-<hash12>``."""

    def __init__(self, spec: DSTSpec, data=None, model_fn=None, model_id=None):
        if spec.density is None:
            raise UsageError("give the target: --sparsity S or --density D")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        # an unreachable target fails before anything is written
        self.densities = layer_densities(
            probe,
            spec.density,
            allocation_of(spec.distribution),
            ("first",) if spec.first_dense else (),
        )
        self.macs = layer_macs(probe, self.data.input_shape)

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        vdir = self.dir / f"replicate-{r}" / "level-1" / spec.algorithm
        if (vdir / "result.json").exists():
            return
        model = self.model_fn(self.seed(r, "init"))
        mask = random_sparse_mask(
            model,
            spec.density,
            spec.distribution,
            spec.first_dense,
            torch.Generator().manual_seed(self.seed(r, "dst/mask")),
        )
        vdir.mkdir(parents=True, exist_ok=True)
        mask.save(vdir / "mask.safetensors")
        rewind(model, snapshot(model), mask)
        save_state(vdir / "weights_start.safetensors", snapshot(model), mask)
        callbacks, updater = [], None
        t_end = int(round(spec.t_end * res.steps))
        ckpt = vdir / "checkpoint.safetensors"
        if spec.algorithm != "static":
            skip = {mask.names()[0]} if spec.first_dense else set()
            updater = DSTUpdater(
                spec.algorithm,
                mask,
                spec.delta_t,
                spec.alpha,
                t_end,
                skip=skip,
                generator=torch.Generator().manual_seed(self.seed(r, "dst/grow")),
                log=vdir / "dst_updates.jsonl",
                state=vdir / DST_STATE,
                schedule=spec.resolved_drop_schedule(),
            )
            # a half-done variant continues from its checkpoint with the mask it had then
            if not (ckpt.exists() and updater.restore(vdir / DST_STATE, checkpoint_step(ckpt))):
                for stale in ("checkpoint.safetensors", "metrics.jsonl", DST_STATE):
                    (vdir / stale).unlink(missing_ok=True)
                (vdir / "dst_updates.jsonl").write_text("")
            mask = updater.mask
            callbacks.append(updater)
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
            label=f"rep {r} {spec.algorithm} ({100 * mask.density():.1f}%)",
            callbacks=callbacks,
            # a checkpoint after each mask update, so the saved DST state matches one
            checkpoint_steps=range(spec.delta_t, t_end, spec.delta_t) if updater else (),
        )
        final = updater.mask if updater is not None else mask
        final.save(vdir / "mask_end.safetensors")
        save_state(vdir / "weights_end.safetensors", snapshot(model), final)
        f_s = forward_flops(self.macs, final.layer_density())
        f_d = forward_flops(self.macs)
        per_example = train_flops_per_example(
            spec.algorithm, f_s, f_d, spec.delta_t, res.steps, t_end
        )
        row = {
            "method": spec.method,
            "replicate": r,
            "level": 1,
            "variant": spec.algorithm,
            "density": final.density(),
            "density_all": model_density(model),
            **metrics,
            "algorithm": spec.algorithm,
            "distribution": spec.distribution,
            "drop_schedule": spec.resolved_drop_schedule() or "",
            "forward_flops": f_s,
            "forward_flops_dense": f_d,
            "train_flops": per_example * spec.batch_size,
            "train_flops_vs_dense": per_example / (3 * f_d * res.steps),
            "mask_updates": len(updater.updates) if updater is not None else 0,
            "connections_moved": sum(u["moved"] for u in updater.updates) if updater else 0,
            "status": "done",
        }
        write_json(vdir / "result.json", row)
        (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
        (vdir / DST_STATE).unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)


__all__ = [
    "DSTExperiment",
    "DROP_SCHEDULES",
    "DSTSpec",
    "DSTUpdater",
    "default_drop_schedule",
    "drop_fraction",
    "random_sparse_mask",
    "train_flops_per_example",
    "update_mask",
]
