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
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import Dataset, structure, with_label_noise
from .data import load as load_data
from .distributed import data_parallel, is_writer, mirror_dir
from .errors import Diverged, UsageError, WorkFailed
from .executors import describe_failure, report_results, run_parallel
from .masks import Mask, model_density, set_prunable
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
    resolve_device,
    resolved_dict,
    spec_hash,
    unhashed_fields,
)
from .train import lr_at, steps_per_epoch, train
from .vectorized import Copy, train_stacked, why_not_vectorized, why_not_vectorized_run


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

    VECTORIZES = False  # whether the method implements --vectorize

    def __init__(
        self,
        spec: Spec,
        data: Dataset | None = None,
        model_fn: Callable[[int], nn.Module] | None = None,
        model_id: str | None = None,
    ):
        if spec.vectorize and not self.VECTORIZES:
            raise UsageError(
                f"--vectorize is not available for {spec.method}; it vectorises lottery and "
                "train (use --jobs N to run replicates in parallel)"
            )
        self.spec = spec
        # where the run trains, checked before anything is loaded or written
        self.device = resolve_device(spec.device, spec.jobs)
        if self.device.type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(self.device)  # a torchrun rank's collectives use its GPU
        self.data = (
            load_data(
                spec.dataset,
                data_dir=spec.data_dir,
                val_size=spec.val_size,
                split_seed=spec.seed,
                augment=spec.augment,
                workers=spec.workers,
                bad_files=spec.bad_files,
                image_size=spec.image_size,
                label_noise=spec.label_noise,
                noise_seed=label_noise_seed(spec),
            )
            if data is None
            else with_label_noise(data, spec.label_noise, label_noise_seed(spec))
        )
        # once for the whole run, so each phase's move to the model's device is a no-op
        self.data = data_on_device(self.data, self.device)
        shape, classes = self.data.input_shape, self.data.num_classes
        if model_fn is None:

            def model_fn(seed: int) -> nn.Module:
                return build(spec.model, shape, classes, spec.width, spec.init, seed)

        if spec.prunable or spec.prunable_exclude:
            # every model the run builds carries the selection, so each mask made from it
            # (Mask.dense), each criterion and allocation prunes the selected parameters
            chosen = model_fn

            def model_fn(seed: int) -> nn.Module:
                return set_prunable(chosen(seed), spec.prunable, spec.prunable_exclude)

        # built (and initialised, by seed) as before, then placed: the same weights anywhere
        built, device = model_fn, self.device

        def model_fn(seed: int) -> nn.Module:
            return built(seed).to(device)

        self.model_fn = model_fn
        self.spe = steps_per_epoch(self.data, spec.batch_size)
        self.res: Resolved = resolve(spec, self.spe)
        self.identity = identity(spec, self.spe)
        if model_id is not None:
            self.identity["model"] = model_id
        if data is not None:
            self.identity["dataset"] = f"{data.name}:{data.n_train}"
        elif getattr(self.data, "fingerprint", ""):  # files read from --data-dir
            self.identity["dataset"] = f"{spec.dataset}:{self.data.fingerprint}"
        self.hash = spec_hash(self.identity)
        self._told: set[str] = set()  # what --vectorize could not stack, said once
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
        dp = data_parallel()
        if dp is not None:
            if spec.jobs > 1 or spec.vectorize:
                raise UsageError("under torchrun each rank is one process: drop --jobs/--vectorize")
            if not is_writer():  # rank 0 writes the store; this rank, a mirror of it
                self.dir = _mirror(self.dir)
            dp.barrier()  # every mirror is taken before rank 0 writes anything

    # seeds ------------------------------------------------------------------
    def seed(self, replicate: int, purpose: str) -> int:
        return replicate_seed(self.spec, replicate, purpose)

    def training_flops(self, mask: Mask, steps: int, batch_size: int | None = None) -> float:
        """FLOPs of training ``steps`` steps on ``mask``: 3 f_S per example (forward and
        backward), f_S from :func:`ticketlab.metrics.forward_flops` at the mask's
        per-layer densities, exactly as ``ticketlab dst`` counts a static mask."""
        if getattr(self, "_train_macs", None) is None:
            self._train_macs = layer_macs(self.model_fn(0), self.data.probe_input())
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
            input_shape=self.data.input_shape,
            loss_fn=self.spec.loss_fn if self.spec.loss_fn is not None else F.cross_entropy,
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
            if spec.vectorize:  # the replicates as stacks, level by level
                rs = list(range(spec.replicates))
                diverged = self._replicates_vectorized(rs, levels, progress)
            elif jobs > 1:  # replicates in worker processes; this process writes results.csv
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

    def _replicates_vectorized(self, rs: list[int], levels: int, progress) -> list[Diverged]:
        """``--vectorize``: the replicates ``rs`` trained as stacks (methods that can)."""
        raise NotImplementedError(f"{type(self).__name__} does not vectorise")

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
        mask = self._prepare_variant(model, vdir, r, level, variant, start_state, mask)
        if mask is None:
            return
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
                label=_label(r, level, variant, mask),
                callbacks=callbacks,
            )
        except Diverged as exc:
            self._variant_diverged(exc, vdir, r, level, variant, mask)
            raise
        self._finish_variant(
            model, vdir, r, level, variant, mask, metrics, phase, spec, extra, prior_flops
        )

    def _prepare_variant(self, model, vdir: Path, r, level, variant, start_state, mask):
        """Set ``model`` up to train a variant: its mask (the stored one on a resume) and
        start weights, both saved. None when the variant is done; a stored divergence is
        raised again (not retried: later levels need this one)."""
        if (vdir / "result.json").exists():
            done = read_json(vdir / "result.json")
            if done.get("status") == "diverged":
                raise Diverged(
                    f"rep {r} level {level} {variant}",
                    int(done.get("diverged_step", -1)),
                    vdir,
                    note=not_retried(vdir),
                )
            return None
        vdir.mkdir(parents=True, exist_ok=True)
        mask_path = vdir / "mask.safetensors"
        if mask_path.exists():
            mask = Mask.load(mask_path)
        else:
            mask.save(mask_path)
        mask = mask.to(_device_of(model))  # a stored mask loads on the CPU
        rewind(model, start_state, mask)
        if not (vdir / "weights_start.safetensors").exists():
            save_state(vdir / "weights_start.safetensors", snapshot(model), mask)
        return mask

    def _variant_diverged(self, exc: Diverged, vdir: Path, r, level, variant, mask) -> None:
        row = diverged_row(exc, self.spec.method, r, level)
        row.update(variant=variant, density=mask.density())
        write_json(vdir / "result.json", row)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS)

    def _finish_variant(
        self, model, vdir, r, level, variant, mask, metrics, phase, spec, extra, prior_flops
    ) -> None:
        # compact where the mask prunes most of a layer (a weight a callback grew back
        # is kept: everything nonzero is)
        begin, end, _ = phase
        save_state(vdir / "weights_end.safetensors", snapshot(model), mask)
        row = {
            "method": self.spec.method,
            "replicate": r,
            "level": level,
            "variant": variant,
            "density": mask.density(),
            "density_all": model_density(model),
            **sparsity_metrics(model, mask, self.data.probe_input()),
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

    def _variants(self, items: list[dict], progress=None) -> list[Diverged | None]:
        """Train several independent variants (each a dict of :meth:`_variant`'s
        arguments, with ``model`` its own module); per item, its divergence or None.

        With ``spec.vectorize``, those not done yet that share an architecture and a
        phase train as one stack (:func:`ticketlab.vectorized.train_stacked`); what
        cannot be stacked trains one after another, and the reason is printed once."""
        outcome: list[Diverged | None] = [None] * len(items)
        todo = [i for i, it in enumerate(items) if not (it["vdir"] / "result.json").exists()]
        stacked = self.spec.vectorize and len(todo) > 1 and self._stackable(items, todo)
        if not stacked:
            for i, it in enumerate(items):
                try:
                    self._variant(progress=progress, **it)
                except Diverged as exc:
                    outcome[i] = exc
            return outcome
        copies = []
        for i in todo:
            it = items[i]
            mask = self._prepare_variant(
                it["model"], it["vdir"], it["r"], it["level"], it["variant"],
                it["start_state"], it["mask"],
            )  # fmt: skip
            it = items[i] = {**it, "mask": mask}
            copies.append(
                Copy(
                    it["model"],
                    mask,
                    self.seed(it["r"], "data"),
                    self.seed(it["r"], "aug"),
                    it["vdir"],
                    _label(it["r"], it["level"], it["variant"], mask),
                    set(it.get("snapshot_steps", ())),
                    it.get("on_snapshot"),
                )
            )
        begin, end, lr = items[todo[0]]["phase"]
        level = items[todo[0]]["level"]
        results = train_stacked(
            copies,
            self.data,
            self.spec,
            start=begin,
            end=end,
            lr_override=lr,
            progress=progress,
            label=f"level {level}: {len(copies)} copies vectorised",
        )
        for i, got in zip(todo, results):
            it = items[i]
            where = (it["vdir"], it["r"], it["level"], it["variant"], it["mask"])
            if isinstance(got, Diverged):
                self._variant_diverged(got, *where)
                outcome[i] = got
            else:
                self._finish_variant(
                    it["model"], *where, got, it["phase"], None, it.get("extra"),
                    it.get("prior_flops"),
                )  # fmt: skip
        return outcome

    def _stackable(self, items, todo) -> bool:
        """Whether the items ``todo`` can train as one stack; if not, say why, once."""
        first = items[todo[0]]
        reason = why_not_vectorized([items[i]["model"] for i in todo])
        reason = reason or why_not_vectorized_run(self.spec, self.data)
        if reason is None and any(items[i]["phase"] != first["phase"] for i in todo):
            reason = "the variants train different phases"
        if reason is None and any(items[i].get("callbacks") for i in todo):
            reason = "a method's training callbacks act on one model at a time"
        # resuming a phase that was interrupted sequentially: only some have checkpoints
        ckpts = {(items[i]["vdir"] / "checkpoint.safetensors").exists() for i in todo}
        if reason is None and len(ckpts) > 1:
            reason = "only some variants have a checkpoint to resume from"
        if reason is not None and reason not in self._told:
            self._told.add(reason)
            print(f"ticketlab: --vectorize: training one at a time: {reason}", file=sys.stderr)
        return reason is None


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def data_on_device(data: Dataset, device: torch.device) -> Dataset:
    """``data`` with its in-memory splits on ``device`` (a shallow copy; ``data`` itself is
    not changed). Streamed data stays as it is: its loader moves each batch."""
    if hasattr(data, "train_stream"):
        return data
    splits = [f"{p}_{s}" for s in ("train", "val", "test") for p in ("x", "y")]
    leaves = [t for name in splits for t in structure.leaves(getattr(data, name))]
    if all(t.device == device for t in leaves):
        return data
    moved = copy.copy(data)
    for name in splits:
        setattr(moved, name, structure.to_device(getattr(data, name), device))
    return moved


def _label(r: int, level: int, variant: str, mask: Mask) -> str:
    return f"rep {r} level {level} {variant} ({100 * mask.density():.1f}%)"


def _mirror(run_dir: Path) -> Path:
    """A fresh private copy of ``run_dir`` (as rank 0 left it) for a rank > 0 to write."""
    mirror = mirror_dir(run_dir)
    shutil.rmtree(mirror, ignore_errors=True)
    if run_dir.exists():
        shutil.copytree(run_dir, mirror, ignore=shutil.ignore_patterns("lock", "*.tmp*"))
    return mirror


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
