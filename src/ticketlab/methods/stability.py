"""Stability to SGD noise: linear mode connectivity (Frankle et al. 2020).

Per replicate, the dense network is trained from its initialisation to each
rewind point k (one trajectory, its weights saved at every k). For each level L
and each k, two copies start from those weights at step k, masked with the
lottery mask of level L (level 0: dense), and train on steps [k, T) with the
same augmentation seed but different data-order seeds (copy 1 continues the
trajectory's order, copy 2 draws a new one). The test error is measured at
``path_points`` evenly spaced points of the straight line between the copies'
final weights; with BatchNorm, running statistics are recomputed at every point
on ``bn_batches`` fixed training batches. Instability is the maximum error on
the path minus the mean of the endpoints' errors.

The mask of level L > 0 at rewind point k is that of IMP with rewinding to the
same k, as Frankle et al. (2020) find each sparse subnetwork: the lottery run
with this spec and ``rewind=k`` (``method=lottery``, levels up to the largest
tested), run or reused in the same runs directory, so a ``ticketlab lottery
--rewind k`` run with the same settings is found by its hash and not re-run.
Each k thus costs one IMP run (its dense level 0 included). With ``--protocol
finetune`` or ``lr-rewind`` IMP does not rewind, and every k uses the one
lottery run with the spec's own settings. With the default ``rewind`` protocol
the spec's own ``--rewind`` would mean nothing, so it is refused. A run directory
whose level > 0 results were made by an older ticketlab (one mask for every k)
is refused rather than reused.

Run store: ``<runs-dir>/stability-<hash12>/`` with
``replicate-<r>/parent/step-<k>.safetensors``,
``replicate-<r>/level-<L>/rewind-<k>/copy-{1,2}/`` (weights, metrics, result.json),
``.../rewind-<k>/path.json``, ``result.json`` and, for L > 0, ``mask.safetensors``
(the mask the copies were trained with). ``results.csv`` has one row
per (replicate, level, rewind step): the contract columns (accuracies and losses
are the mean of the two copies; ``steps`` and ``train_seconds`` per copy and
summed) and the key columns ``rewind_step`` and ``instability``, plus
``error_endpoints``, ``error_max``, ``alpha_max``, ``path_points``,
``bn_batches`` (batches used to recompute BatchNorm stats; 0 without BN) and
``mask_run`` (the lottery run directory whose mask was used; empty for level 0).
``paths.csv`` has one row per point: replicate, level, rewind_step, alpha,
test_error, test_loss, bn_batches. Rewind points and levels only extend a run
and are not hashed; path points and BN batches are.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from ..analysis import instability, interpolation_path
from ..data import load as load_data
from ..errors import UsageError
from ..experiment import data_on_device, label_noise_seed, replicate_seed
from ..masks import Mask, model_density
from ..models import build
from ..protocols import rewind, snapshot
from ..runs import (
    RESULT_COLUMNS,
    RunLock,
    load_state,
    open_run,
    read_json,
    save_state,
    write_csv,
    write_json,
    write_spec,
)
from ..spec import (
    Spec,
    derive_seed,
    identity,
    parse_steps,
    resolve,
    resolve_device,
    resolved_dict,
    spec_hash,
    unhashed_fields,
)
from ..train import steps_per_epoch, train
from .lottery import LotteryExperiment

# Knobs that only extend a stability run.
KEY_COLUMNS = ["rewind_step", "instability", "error_endpoints", "error_max", "alpha_max"]
KEY_COLUMNS += ["path_points", "bn_batches", "mask_run"]
PATH_COLUMNS = ["replicate", "level", "rewind_step", "alpha", "test_error", "test_loss"]
PATH_COLUMNS += ["bn_batches"]


@dataclass(frozen=True)
class StabilitySpec(Spec):
    EXTENDS = frozenset({"rewind_points", "stability_levels"})  # more of them extend a run

    method: str = "stability"
    rewind_points: tuple[str, ...] = ("0it",)
    stability_levels: tuple[int, ...] = (0,)
    path_points: int = 30
    bn_batches: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "rewind_points", tuple(str(k) for k in self.rewind_points))
        try:
            levels = tuple(sorted({int(v) for v in self.stability_levels}))
        except (TypeError, ValueError):
            msg = f"stability levels must be integers; got {self.stability_levels}"
            raise UsageError(msg) from None
        object.__setattr__(self, "stability_levels", levels)
        if not self.rewind_points:
            raise UsageError("give at least one rewind point")
        for k in self.rewind_points:
            parse_steps(k, 1, "rewind point")  # format only: epochs need the dataset
        if not levels or levels[0] < 0:
            raise UsageError(f"stability levels must be >= 0; got {self.stability_levels}")
        if self.path_points < 2:
            raise UsageError(f"path points must be >= 2; got {self.path_points}")
        if self.bn_batches < 0:
            raise UsageError(f"bn batches must be >= 0; got {self.bn_batches}")


def lottery_spec(spec: StabilitySpec, k: int | None = None) -> Spec:
    """The lottery run whose masks a stability run tests at rewind point ``k`` (in
    iterations): IMP rewound to ``k``. ``None`` keeps the spec's own rewind (the
    protocols that do not rewind)."""
    values = {f.name: getattr(spec, f.name) for f in fields(Spec)}
    values.update(method="lottery", levels=max(spec.stability_levels), controls=())
    if k is not None:
        values["rewind"] = f"{k}it"  # resolved the same as any spelling of k: the same hash
    return Spec(**values)


class Stability:
    def __init__(self, spec: StabilitySpec):
        self.spec = spec
        self.device = resolve_device(spec.device, spec.jobs)  # before anything is loaded
        self.data = load_data(
            spec.dataset,
            data_dir=spec.data_dir,
            val_size=spec.val_size,
            split_seed=spec.seed,
            augment=spec.augment,
            label_noise=spec.label_noise,
            noise_seed=label_noise_seed(spec),
        )
        self.data = data_on_device(self.data, self.device)
        self.spe = steps_per_epoch(self.data, spec.batch_size)
        self.res = resolve(spec, self.spe)
        ks = sorted({parse_steps(k, self.spe, "rewind point") for k in spec.rewind_points})
        if ks[-1] >= self.res.steps:
            raise UsageError(f"rewind point {ks[-1]} must be before the end of training")
        self.ks = ks
        if spec.protocol == "rewind" and self.res.rewind != 0:
            msg = (
                f"stability rewinds the lottery to each rewind point k, so --rewind"
                f" ({spec.rewind}) is not used; give the points with --rewind-points"
            )
            raise UsageError(msg)
        self.identity = identity(spec, self.spe)
        self.hash = spec_hash(self.identity)
        # k -> the lottery run whose level-L masks are tested at k (IMP rewound to k)
        self.lotteries: dict[int, LotteryExperiment] = {}
        if max(spec.stability_levels) > 0:
            if spec.protocol == "rewind":
                for k in ks:
                    self.lotteries[k] = LotteryExperiment(lottery_spec(spec, k), data=None)
            else:
                one = LotteryExperiment(lottery_spec(spec), data=None)
                self.lotteries = dict.fromkeys(ks, one)
        self.dir = open_run(
            spec.runs_dir,
            "stability",
            self.hash,
            self.identity,
            resolved_dict(spec, self.spe),
            unhashed_fields(spec),
        )
        self._refuse_one_mask_runs()

    def _refuse_one_mask_runs(self) -> None:
        """Results at level > 0 without the mask they used are an older ticketlab's, which
        masked every k with one lottery run's mask: not reused (nothing is written)."""
        for kdir in sorted(self.dir.glob("replicate-*/level-*/rewind-*")):
            level = kdir.parent.name.removeprefix("level-")
            if not (level.isdigit() and int(level) > 0) or (kdir / "mask.safetensors").exists():
                continue
            if any(kdir.iterdir()):  # an empty one is this version's, stopped before its mask
                msg = (
                    f"run {self.dir} has results made with one lottery mask for every rewind"
                    f" point ({kdir.relative_to(self.dir)}); move it away or use another --runs-dir"
                )
                raise UsageError(msg)

    def model(self, r: int):
        s = self.spec
        shape, classes = self.data.input_shape, self.data.num_classes
        model = build(s.model, shape, classes, s.width, s.init, replicate_seed(s, r, "init"))
        return model.to(self.device)

    def run(self, progress=None) -> list[dict]:
        for lottery in {id(e): e for e in self.lotteries.values()}.values():
            lottery.run(progress)
        self.dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.dir):
            write_spec(
                self.dir, self.identity, self.hash, resolved_dict(self.spec, self.spe), self.spe
            )
            for r in range(self.spec.replicates):
                self._replicate(r, progress)
        return collect(self.dir)

    def _parent(self, r: int, model, progress) -> dict[int, dict]:
        """Weights of the dense trajectory at every rewind point."""
        pdir = self.dir / f"replicate-{r}" / "parent"
        paths = {k: pdir / f"step-{k}.safetensors" for k in self.ks}
        if not all(p.exists() for p in paths.values()):

            def save(step: int, m) -> None:
                if step in paths and not paths[step].exists():
                    save_state(paths[step], snapshot(m))

            save(0, model)
            if self.ks[-1] > 0:
                train(
                    model,
                    self.data,
                    self.spec,
                    Mask.dense(model),
                    start=0,
                    end=self.ks[-1],
                    data_seed=replicate_seed(self.spec, r, "data"),
                    aug_seed=replicate_seed(self.spec, r, "aug"),
                    workdir=pdir,
                    snapshot_steps=set(self.ks),
                    on_snapshot=save,
                    progress=progress,
                    label=f"rep {r} dense to step {self.ks[-1]}",
                )
                # a later, longer list of rewind points retrains from step 0 (deterministic)
                (pdir / "checkpoint.safetensors").unlink(missing_ok=True)
        return {k: load_state(p) for k, p in paths.items()}

    def _replicate(self, r: int, progress) -> None:
        spec = self.spec
        model = self.model(r)
        parent = self._parent(r, model, progress)
        seeds = {
            1: replicate_seed(spec, r, "data"),
            2: derive_seed(spec.seed, r, "data/stability-copy-2"),
        }
        for level in spec.stability_levels:
            for k in self.ks:
                kdir = self.dir / f"replicate-{r}" / f"level-{level}" / f"rewind-{k}"
                if (kdir / "result.json").exists():
                    continue
                if level == 0:
                    mask, mask_run = Mask.dense(model), ""
                else:
                    lottery = self.lotteries[k].dir
                    mask = Mask.load(
                        lottery / f"replicate-{r}" / f"level-{level}" / "mask.safetensors"
                    )
                    mask_run = lottery.name
                    kdir.mkdir(parents=True, exist_ok=True)
                    mask.save(kdir / "mask.safetensors")
                ends, metrics = {}, {}
                for c in (1, 2):
                    cdir = kdir / f"copy-{c}"
                    if not (cdir / "result.json").exists():
                        rewind(model, parent[k], mask)
                        m = train(
                            model,
                            self.data,
                            spec,
                            mask,
                            start=k,
                            end=self.res.steps,
                            data_seed=seeds[c],
                            aug_seed=replicate_seed(spec, r, "aug"),
                            workdir=cdir,
                            progress=progress,
                            label=f"rep {r} level {level} k={k} copy {c}",
                        )
                        save_state(cdir / "weights_end.safetensors", snapshot(model), mask)
                        m["density_all"] = model_density(model)
                        write_json(cdir / "result.json", m)
                        (cdir / "checkpoint.safetensors").unlink(missing_ok=True)
                    metrics[c] = read_json(cdir / "result.json")
                    ends[c] = load_state(cdir / "weights_end.safetensors")
                path = interpolation_path(
                    model,
                    ends[1],
                    ends[2],
                    self.data,
                    points=spec.path_points,
                    bn_batches=spec.bn_batches,
                    batch_size=spec.batch_size,
                    bn_seed=derive_seed(spec.seed, r, "bn"),
                    eval_batch_size=spec.eval_batch_size,
                )
                write_json(kdir / "path.json", path)
                errors = [p["test_error"] for p in path]
                worst = max(range(len(errors)), key=errors.__getitem__)
                row = {
                    "method": "stability",
                    "replicate": r,
                    "level": level,
                    "variant": "ticket",
                    "density": mask.density(),
                }
                for key in RESULT_COLUMNS:
                    if key in metrics[1] and key not in ("steps", "train_seconds"):
                        row[key] = 0.5 * (metrics[1][key] + metrics[2][key])
                row["steps"] = metrics[1]["steps"]
                row["train_seconds"] = metrics[1]["train_seconds"] + metrics[2]["train_seconds"]
                row.update(
                    rewind_step=k,
                    instability=instability(errors),
                    error_endpoints=0.5 * (errors[0] + errors[-1]),
                    error_max=errors[worst],
                    alpha_max=path[worst]["alpha"],
                    path_points=len(path),
                    bn_batches=path[0]["bn_batches"],
                    mask_run=mask_run,
                    status="done",
                )
                write_json(kdir / "result.json", row)
                rows = collect(self.dir)
                write_csv(self.dir / "results.csv", rows, RESULT_COLUMNS + KEY_COLUMNS)
                write_csv(self.dir / "paths.csv", collect_paths(self.dir), PATH_COLUMNS)


def _kdirs(run_dir: Path):
    for path in Path(run_dir).glob("replicate-*/level-*/rewind-*/result.json"):
        yield path.parent, read_json(path)


def collect(run_dir: Path) -> list[dict]:
    rows = [row for _, row in _kdirs(run_dir)]
    rows.sort(key=lambda r: (r["replicate"], r["level"], r["rewind_step"]))
    return rows


def collect_paths(run_dir: Path) -> list[dict]:
    out = []
    for kdir, row in _kdirs(run_dir):
        for p in read_json(kdir / "path.json"):
            out.append(
                {
                    "replicate": row["replicate"],
                    "level": row["level"],
                    "rewind_step": row["rewind_step"],
                    **p,
                }
            )
    out.sort(key=lambda p: (p["replicate"], p["level"], p["rewind_step"], p["alpha"]))
    return out


def run_stability(spec: StabilitySpec, progress=None) -> list[dict]:
    """Run (or resume) a stability experiment; its rows as in ``results.csv``."""
    from ..train import stop_on_signals

    exp = Stability(spec)  # validates and loads data: nothing is written before this
    with stop_on_signals():
        return exp.run(progress)


__all__ = ["StabilitySpec", "Stability", "run_stability"]
