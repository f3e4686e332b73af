"""Iterative magnitude pruning with rewinding, and the dense baseline.

Per replicate: level 0 trains the dense network for T steps and saves its
weights at the rewind step k once. Level L prunes the previous level's trained
ticket, then trains the surviving weights according to the protocol:

- ``rewind``: the weights at step k of the dense run, trained on [k, T) with
  the LR schedule fast-forwarded and the data order continued from k;
- ``finetune``: the previous level's final weights, trained t steps at the
  final LR of the original schedule;
- ``lr-rewind``: the previous level's final weights, trained on [T - t, T) with
  the schedule replayed.

Controls use the same mask and train like a rewound ticket on [k, T).

``train_flops`` counts what it cost to get a row's network: a ticket at level L
sums every IMP level 0..L (the dense level 0 included), each level's steps x
batch size x 3 f_S, with f_S the forward multiply-adds at that level's mask as
``ticketlab dst`` counts a static mask (so the two compare); a control counts the
levels 0..L-1 that produced its mask plus its own training.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data import Dataset
from ..errors import Diverged, WorkFailed
from ..executors import WorkerPool, describe_failure, in_worker, threads_per_worker
from ..experiment import Experiment, collect_results, run_on_module
from ..masks import Mask
from ..protocols import random_mask, random_reinit, reshuffle, rewind, signed_constant, snapshot
from ..pruning import prune
from ..runs import RESULT_COLUMNS, load_state, save_state
from ..spec import Spec


class LotteryExperiment(Experiment):
    """A lottery (or dense ``train``) experiment bound to its run directory."""

    VECTORIZES = True

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        model = self.model_fn(self.seed(r, "init"))
        init_state = snapshot(model)
        rewind_path = rdir / "rewind.safetensors"
        variant0 = "dense" if spec.method == "train" else "ticket"

        def save_rewind(step: int, m: nn.Module) -> None:
            if not rewind_path.exists():
                save_state(rewind_path, snapshot(m))

        self._variant(
            model,
            rdir / "level-0" / variant0,
            r,
            0,
            variant0,
            start_state=init_state,
            mask=Mask.dense(model),
            phase=(0, res.steps, None),
            snapshot_steps={res.rewind},
            on_snapshot=save_rewind,
            progress=progress,
            prior_flops=0.0,
        )
        if levels == 0:
            return
        side = self._control_pool(progress)
        try:
            self._levels(r, levels, model, init_state, side, progress)
            if side is not None:
                results, failed = side.collect()
        finally:
            if side is not None:
                side.close()
                torch.set_num_threads(self._threads)
        if side is not None:  # the workers' rows and ours, written once by this process
            self.write_results(collect_results(self.dir), RESULT_COLUMNS)
            if failed:
                what = "; ".join(
                    f"replicate {r} level {lv} {c}: {describe_failure(e)}"
                    for (_, lv, c, _), e in sorted(failed.items(), key=lambda t: t[0][:3])
                )
                raise WorkFailed(
                    f"{what}; the other results are stored: run the same command to resume"
                )
            diverged = [d for _, d in sorted(results.items(), key=lambda t: t[0][:3]) if d]
            if diverged:
                raise diverged[0]

    def _control_pool(self, progress) -> WorkerPool | None:
        """With ``--jobs N`` and one replicate, the controls of each level train in N - 1
        worker processes once the level's mask exists, while this process goes on with
        the tickets; each process gets cores/N threads."""
        spec = self.spec
        if spec.jobs < 2 or not spec.controls or spec.replicates > 1 or in_worker():
            return None
        self._threads = torch.get_num_threads()
        torch.set_num_threads(threads_per_worker(spec.jobs))
        return WorkerPool(self._control, spec.jobs - 1, progress, threads_per_worker(spec.jobs))

    def _control(self, item, progress=None, model: nn.Module | None = None):
        """Train one control of one level from what is on disk (so a worker can): the
        level's mask and the rewind point. A divergence is recorded and returned."""
        r, level, control, imp_flops = item
        model = model if model is not None else self.model_fn(self.seed(r, "init"))
        try:
            self._variant(progress=progress, **self._control_item(item, model))
        except Diverged as exc:
            if in_worker():  # the parent raises it once the level's work is collected
                self._record_divergence(exc, r)
                return exc
            raise
        return None

    def _control_item(self, item, model) -> dict:
        """The :meth:`_variant` arguments of one control of one level, from what is on
        disk: the level's mask and the rewind point."""
        r, level, control, imp_flops = item
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        rewind_state = load_state(rdir / "rewind.safetensors")
        mask = Mask.load(rdir / f"level-{level}" / "mask.safetensors")
        cseed = self.seed(r, f"{control}/{level}")
        cmask, cstart = mask, rewind_state
        if control == "reinit":
            cstart = random_reinit(model, spec.init, cseed)
        elif control == "reshuffle":
            cstart = reshuffle(rewind_state, mask, cseed)
        elif control == "signed-constant":
            cstart = signed_constant(rewind_state, mask, spec.init)
        elif control == "random-mask":
            cmask = random_mask(mask, cseed)
        return dict(
            model=model,
            vdir=rdir / f"level-{level}" / control,
            r=r,
            level=level,
            variant=control,
            start_state=cstart,
            mask=cmask,
            phase=(res.rewind, res.steps, None),
            prior_flops=imp_flops,
        )

    def _level_mask(self, r: int, level: int, model, init_state) -> Mask:
        """Level ``level``'s mask: stored, or pruned from the previous level's ticket."""
        spec = self.spec
        rdir = self.dir / f"replicate-{r}"
        prev = rdir / f"level-{level - 1}" / "ticket"
        mask_path = rdir / f"level-{level}" / "mask.safetensors"
        if mask_path.exists():
            return Mask.load(mask_path)
        rewind(model, load_state(prev / "weights_end.safetensors"))
        gen = torch.Generator().manual_seed(self.seed(r, f"prune/{level}"))
        mask = prune(
            model,
            Mask.load(prev / "mask.safetensors"),
            self.fractions,
            scope=spec.scope,
            criterion=spec.criterion,
            context=self.level_context(gen, init_state),
        )
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        mask.save(mask_path)
        return mask

    def _ticket_start(self, r: int, level: int) -> dict:
        rdir = self.dir / f"replicate-{r}"
        if self.spec.protocol == "rewind":
            return load_state(rdir / "rewind.safetensors")
        return load_state(rdir / f"level-{level - 1}" / "ticket" / "weights_end.safetensors")

    def _replicates_vectorized(self, rs: list[int], levels: int, progress) -> list[Diverged]:
        """``--vectorize``: the replicates in lockstep, level by level; at each level the
        tickets of all replicates, then all their controls, train as one stack each
        (:meth:`Experiment._variants`). A replicate that diverges stops there."""
        spec, res = self.spec, self.res
        variant0 = "dense" if spec.method == "train" else "ticket"
        models = {r: self.model_fn(self.seed(r, "init")) for r in rs}
        inits = {r: snapshot(m) for r, m in models.items()}
        items = []
        for r in rs:
            rewind_path = self.dir / f"replicate-{r}" / "rewind.safetensors"

            def save_rewind(step: int, m: nn.Module, path=rewind_path) -> None:
                if not path.exists():
                    save_state(path, snapshot(m))

            items.append(
                dict(
                    model=models[r],
                    vdir=self.dir / f"replicate-{r}" / "level-0" / variant0,
                    r=r,
                    level=0,
                    variant=variant0,
                    start_state=inits[r],
                    mask=Mask.dense(models[r]),
                    phase=(0, res.steps, None),
                    snapshot_steps={res.rewind},
                    on_snapshot=save_rewind,
                    prior_flops=0.0,
                )
            )
        diverged = {}
        for it, d in zip(items, self._variants(items, progress)):
            if d is not None:
                diverged[it["r"]] = d
        imp_flops = {r: self.training_flops(Mask.dense(models[r]), res.steps) for r in rs}
        for level in range(1, levels + 1):
            alive = [r for r in rs if r not in diverged]
            tickets = []
            for r in alive:
                mask = self._level_mask(r, level, models[r], inits[r])
                tickets.append(
                    dict(
                        model=models[r],
                        vdir=self.dir / f"replicate-{r}" / f"level-{level}" / "ticket",
                        r=r,
                        level=level,
                        variant="ticket",
                        start_state=self._ticket_start(r, level),
                        mask=mask,
                        phase=self._phase(level),
                        prior_flops=imp_flops[r],
                    )
                )
            controls = [
                self._control_item((r, level, c, imp_flops[r]), self.model_fn(self.seed(r, "init")))
                for r in alive
                for c in spec.controls
            ]
            # the tickets first (the next level prunes them), then every control at once
            for group in (tickets, controls):
                for it, d in zip(group, self._variants(group, progress)):
                    if d is not None and it["r"] not in diverged:
                        diverged[it["r"]] = d
            for it in tickets:
                begin, end, _ = self._phase(level)
                imp_flops[it["r"]] += self.training_flops(it["mask"], end - begin)
        return [diverged[r] for r in sorted(diverged)]

    def _levels(self, r: int, levels: int, model, init_state, side, progress) -> None:
        spec, res = self.spec, self.res
        rdir = self.dir / f"replicate-{r}"
        rewind_state = load_state(rdir / "rewind.safetensors")
        # the IMP levels before the current one: what it took to find its mask
        imp_flops = self.training_flops(Mask.dense(model), res.steps)
        for level in range(1, levels + 1):
            ldir = rdir / f"level-{level}"
            mask = self._level_mask(r, level, model, init_state)
            start = rewind_state if spec.protocol == "rewind" else self._ticket_start(r, level)
            self._variant(
                model,
                ldir / "ticket",
                r,
                level,
                "ticket",
                start,
                mask,
                self._phase(level),
                progress=progress,
                prior_flops=imp_flops,
            )
            for control in spec.controls:
                item = (r, level, control, imp_flops)
                if side is not None:  # in a worker, while this process goes on
                    side.submit(item)
                else:
                    self._control(item, progress, model)
            begin, end, _ = self._phase(level)
            imp_flops += self.training_flops(mask, end - begin)


def lottery(model: nn.Module, data: Dataset, spec: Spec, progress=None) -> list[dict]:
    """IMP on a user's own module; later replicates re-initialise it with ``spec.init``."""
    return run_on_module(LotteryExperiment, model, data, spec, progress)


__all__ = ["LotteryExperiment", "lottery"]
