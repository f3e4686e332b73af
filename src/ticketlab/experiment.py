"""The run machinery every method shares.

An :class:`Experiment` owns one run directory (``<runs-dir>/<method>-<hash12>``):
it resolves and hashes the spec, loads the data, takes the run lock, writes
``spec.json``, loops over replicates and trains one variant at a time with skip
and resume (:meth:`Experiment._variant`), writing one result row each. Methods
subclass it and define what a replicate does; :func:`run_on_module` runs any of
them on a user's own module.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .data import Dataset, with_label_noise
from .data import load as load_data
from .errors import Diverged, WorkFailed
from .executors import describe_failure, report_results, run_parallel
from .masks import Mask, model_density
from .metrics import forward_flops, layer_macs, sparsity_metrics, train_flops_per_step
from .models import build, initialize
from .protocols import rewind, snapshot
from .pruning import Context, layer_fractions
from .runs import (
    RESULT_COLUMNS,
    RunLock,
    open_run,
    read_json,
    save_state,
    write_csv,
    write_json,
    write_spec,
)
from .spec import (
    Resolved,
    Spec,
    derive_seed,
    identity,
    resolve,
    resolved_dict,
    spec_hash,
    unhashed_fields,
)
from .train import lr_at, steps_per_epoch, train


def replicate_seed(spec: Spec, replicate: int, purpose: str) -> int:
    """The seed of one purpose (init, data, aug, a control) for a replicate.

    A seed given explicitly (``--init-seed``) is used as is for replicate 0.
    """
    given = {"init": spec.init_seed, "data": spec.data_seed, "aug": spec.aug_seed}.get(purpose)
    if given is not None and replicate == 0:
        return given
    return derive_seed(spec.seed if given is None else given, replicate, purpose)


def label_noise_seed(spec: Spec) -> int:
    """The seed that picks the noisy training labels: one noisy data set per run (its
    replicates share it, as they share the validation split)."""
    return derive_seed(spec.seed, 0, "label-noise")


class Experiment:
    """What every method shares, bound to its run directory.

    A method subclasses it and overrides :meth:`_replicate` (one replicate's work,
    usually a few :meth:`_variant` trainings); the base validates the spec, loads the
    data, opens the run directory, writes ``spec.json`` under the run lock and loops
    over replicates."""

    def __init__(
        self,
        spec: Spec,
        data: Dataset | None = None,
        model_fn: Callable[[int], nn.Module] | None = None,
        model_id: str | None = None,
    ):
        self.spec = spec
        self.data = (
            load_data(
                spec.dataset,
                data_dir=spec.data_dir,
                val_size=spec.val_size,
                split_seed=spec.seed,
                augment=spec.augment,
                label_noise=spec.label_noise,
                noise_seed=label_noise_seed(spec),
            )
            if data is None
            else with_label_noise(data, spec.label_noise, label_noise_seed(spec))
        )
        shape, classes = self.data.input_shape, self.data.num_classes
        if model_fn is None:

            def model_fn(seed: int) -> nn.Module:
                return build(spec.model, shape, classes, spec.width, spec.init, seed)

        self.model_fn = model_fn
        self.spe = steps_per_epoch(self.data, spec.batch_size)
        self.res: Resolved = resolve(spec, self.spe)
        self.identity = identity(spec, self.spe)
        if model_id is not None:
            self.identity["model"] = model_id
        if data is not None:
            self.identity["dataset"] = f"{data.name}:{len(data.y_train)}"
        self.hash = spec_hash(self.identity)
        # Build once now, so bad layer names fail before anything is written.
        probe = self.model_fn(0)
        self.fractions = layer_fractions(
            probe,
            Mask.dense(probe),
            spec.prune_fraction,
            spec.conv_prune_fraction,
            spec.output_prune_fraction,
            spec.dense_layers,
        )
        self.dir = open_run(
            spec.runs_dir,
            spec.method,
            self.hash,
            self.identity,
            resolved_dict(spec, self.spe),
            unhashed_fields(spec),
        )

    # seeds ------------------------------------------------------------------
    def seed(self, replicate: int, purpose: str) -> int:
        return replicate_seed(self.spec, replicate, purpose)

    def training_flops(self, mask: Mask, steps: int, batch_size: int | None = None) -> float:
        """FLOPs of training ``steps`` steps on ``mask``: 3 f_S per example (forward and
        backward), f_S from :func:`ticketlab.metrics.forward_flops` at the mask's
        per-layer densities, exactly as ``ticketlab dst`` counts a static mask."""
        if getattr(self, "_train_macs", None) is None:
            self._train_macs = layer_macs(self.model_fn(0), self.data.input_shape)
        f_s = forward_flops(self._train_macs, mask.layer_density())
        per_example = train_flops_per_step("static", f_s, forward_flops(self._train_macs))
        return per_example * steps * (batch_size or self.spec.batch_size)

    def level_context(self, generator: torch.Generator, init_state: dict) -> Context:
        """What a criterion may need at a level: minibatches of the training data (one of
        ``batch_size``, drawn with ``generator``), the input shape and the initial weights.
        SynFlow gets no target density, so it scores in one round at each level."""
        return Context(
            data=self.data,
            batches=1,
            batch_size=self.spec.batch_size,
            generator=generator,
            init_state=init_state,
            input_shape=tuple(self.data.input_shape),
        )

    # the run ----------------------------------------------------------------
    def run(self, progress=None) -> list[dict]:
        spec = self.spec
        self.dir.mkdir(parents=True, exist_ok=True)
        with RunLock(self.dir):
            write_spec(self.dir, self.identity, self.hash, resolved_dict(spec, self.spe), self.spe)
            levels = 0 if spec.method == "train" else spec.levels
            diverged: list[Diverged] = []
            jobs = min(spec.jobs, spec.replicates)
            if jobs > 1:  # replicates in worker processes; this process writes results.csv
                work = functools.partial(self._replicate_or_diverge, levels=levels)
                results, failed = run_parallel(list(range(spec.replicates)), work, jobs, progress)
                diverged = [d for _, d in sorted(results.items()) if d is not None]
                if failed:
                    what = "; ".join(
                        f"replicate {r}: {describe_failure(e)}" for r, e in sorted(failed.items())
                    )
                    raise WorkFailed(
                        f"{what}; the other replicates' results are stored: run the same "
                        "command to resume what is missing"
                    )
            else:
                for r in range(spec.replicates):
                    d = self._replicate_or_diverge(r, progress, levels=levels)
                    if d is not None:
                        diverged.append(d)
        rows = collect_results(self.dir)
        if diverged:
            first = diverged[0]
            more = f" (and {len(diverged) - 1} more replicates)" if len(diverged) > 1 else ""
            raise Diverged(first.label + more, first.step, first.workdir, first.metrics, first.note)
        stored = [r for r in rows if r.get("status") == "diverged"]
        if stored:  # a resumed run: what diverged is not retried
            r = stored[0]
            raise Diverged(
                f"rep {r['replicate']} level {r['level']} {r['variant']}",
                int(r.get("diverged_step", -1)),
                note=not_retried(self.dir),
            )
        return rows

    def _replicate_or_diverge(self, r: int, progress=None, *, levels: int):
        """Run replicate ``r``; a divergence is recorded and returned, not raised (it
        stops this replicate only)."""
        try:
            self._replicate(r, levels, progress)
        except Diverged as exc:
            self._record_divergence(exc, r)
            return exc
        return None

    def write_results(self, rows: list[dict], columns: list[str]) -> None:
        """Write ``results.csv``; in a worker process, hand it to the parent, the one writer."""
        path = self.dir / "results.csv"
        if not report_results(path, rows, columns):
            write_csv(path, rows, columns)

    def _record_divergence(self, exc: Diverged, r: int) -> None:
        """Make sure the diverged phase has its row (methods that call ``train`` themselves
        leave it to here), so ``show``, ``report`` and a resume see it."""
        if exc.workdir is None:
            return
        vdir = Path(exc.workdir)
        if not (vdir / "result.json").exists():
            level = vdir.parent.name.removeprefix("level-")
            row = diverged_row(exc, self.spec.method, r, int(level) if level.isdigit() else 0)
            row["variant"] = vdir.name
            write_json(vdir / "result.json", row)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)

    def _phase(self, level: int) -> tuple[int, int, float | None]:
        """Steps [start, end) and a fixed LR, for a ticket at ``level``."""
        res, spec = self.res, self.spec
        if level == 0:
            return 0, res.steps, None
        if spec.protocol == "rewind":
            return res.rewind, res.steps, None
        if spec.protocol == "lr-rewind":
            return res.steps - res.retrain_steps, res.steps, None
        final_lr = lr_at(res.steps - 1, spec, res)
        return res.steps, res.steps + res.retrain_steps, final_lr

    def _replicate(self, r: int, levels: int, progress) -> None:
        """One replicate's work: the part each method defines."""
        raise NotImplementedError(f"{type(self).__name__} does not define _replicate")

    def _variant(
        self,
        model,
        vdir: Path,
        r: int,
        level: int,
        variant: str,
        start_state,
        mask: Mask,
        phase,
        snapshot_steps=(),
        on_snapshot=None,
        progress=None,
        spec: Spec | None = None,
        callbacks=(),
        extra: dict | None = None,
        prior_flops: float | None = None,
    ) -> None:
        """Train one variant in ``vdir`` (skipped when done, resumed when half done).

        ``spec`` replaces the experiment's spec for this training (e.g. a longer
        schedule), ``callbacks`` go to the training loop and ``extra`` columns
        (which may override computed ones) to the result row. With ``prior_flops``
        (the training FLOPs that found the mask) the row gets ``train_flops``: those
        plus this training's."""
        if (vdir / "result.json").exists():
            done = read_json(vdir / "result.json")
            if done.get("status") == "diverged":  # not retried: later levels need this one
                raise Diverged(
                    f"rep {r} level {level} {variant}",
                    int(done.get("diverged_step", -1)),
                    vdir,
                    note=not_retried(vdir),
                )
            return
        vdir.mkdir(parents=True, exist_ok=True)
        mask_path = vdir / "mask.safetensors"
        if mask_path.exists():
            mask = Mask.load(mask_path)
        else:
            mask.save(mask_path)
        rewind(model, start_state, mask)
        if not (vdir / "weights_start.safetensors").exists():
            save_state(vdir / "weights_start.safetensors", snapshot(model), mask)
        begin, end, lr = phase
        try:
            metrics = train(
                model,
                self.data,
                spec or self.spec,
                mask,
                start=begin,
                end=end,
                lr_override=lr,
                data_seed=self.seed(r, "data"),
                aug_seed=self.seed(r, "aug"),
                workdir=vdir,
                snapshot_steps=snapshot_steps,
                on_snapshot=on_snapshot,
                progress=progress,
                label=f"rep {r} level {level} {variant} ({100 * mask.density():.1f}%)",
                callbacks=callbacks,
            )
        except Diverged as exc:
            row = diverged_row(exc, self.spec.method, r, level)
            row.update(variant=variant, density=mask.density())
            write_json(vdir / "result.json", row)
            self.write_results(collect_results(self.dir), RESULT_COLUMNS)
            raise
        # compact where the mask prunes most of a layer (a weight a callback grew back
        # is kept: everything nonzero is)
        save_state(vdir / "weights_end.safetensors", snapshot(model), mask)
        row = {
            "method": self.spec.method,
            "replicate": r,
            "level": level,
            "variant": variant,
            "density": mask.density(),
            "density_all": model_density(model),
            **sparsity_metrics(model, mask, self.data.input_shape),
            **metrics,
            "status": "done",
        }
        if prior_flops is not None:
            batch = (spec or self.spec).batch_size
            row["train_flops"] = prior_flops + self.training_flops(mask, end - begin, batch)
        row.update(extra or {})
        write_json(vdir / "result.json", row)
        (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)


def not_retried(where: Path) -> str:
    return (
        f"stored in {where}; not retried: to start over, remove the run directory "
        "or change the setup, e.g. a lower --lr"
    )


def diverged_row(exc: Diverged, method: str, replicate: int, level: int) -> dict:
    """The result row of a diverged phase: where the loss became non-finite and the last
    finite evaluation (its metrics and step)."""
    last = dict(exc.metrics)
    row = {"method": method, "replicate": replicate, "level": level, "variant": ""}
    row.update({k: v for k, v in last.items() if k != "step"})
    row.update(status="diverged", diverged_step=exc.step, last_finite_step=last.get("step", ""))
    return row


def collect_results(run_dir: Path) -> list[dict]:
    rows = []
    for path in Path(run_dir).glob("replicate-*/level-*/*/result.json"):
        rows.append(read_json(path))
    order = {"dense": -1, "ticket": 0}
    rows.sort(key=lambda r: (r["replicate"], r["level"], order.get(r["variant"], 1), r["variant"]))
    return rows


def run_on_module(
    experiment_cls: type, model: nn.Module, data: Dataset, spec: Spec, progress=None
) -> list[dict]:
    """Run an experiment of ``experiment_cls`` on a user's own module and data.

    Replicate 0 starts from the module's own weights; later replicates
    re-initialise a copy with ``spec.init``. The module itself is not changed.
    """
    base = copy.deepcopy(model)
    n_params = sum(p.numel() for p in base.parameters())
    first = replicate_seed(spec, 0, "init")

    def model_fn(seed: int) -> nn.Module:
        m = copy.deepcopy(base)
        if seed != first:
            initialize(m, spec.init, torch.Generator().manual_seed(seed))
        return m

    exp = experiment_cls(
        spec, data=data, model_fn=model_fn, model_id=f"custom:{type(model).__name__}:{n_params}"
    )
    return exp.run(progress)
