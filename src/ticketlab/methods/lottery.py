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
from ..experiment import Experiment, run_on_module
from ..masks import Mask
from ..protocols import random_mask, random_reinit, reshuffle, rewind, signed_constant, snapshot
from ..pruning import prune
from ..runs import load_state, save_state
from ..spec import Spec


class LotteryExperiment(Experiment):
    """A lottery (or dense ``train``) experiment bound to its run directory."""

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
        rewind_state = load_state(rewind_path)
        # the IMP levels before the current one: what it took to find its mask
        imp_flops = self.training_flops(Mask.dense(model), res.steps)
        for level in range(1, levels + 1):
            ldir = rdir / f"level-{level}"
            prev = rdir / f"level-{level - 1}" / "ticket"
            mask_path = ldir / "mask.safetensors"
            if mask_path.exists():
                mask = Mask.load(mask_path)
            else:
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
                mask.save(mask_path)
            if spec.protocol == "rewind":
                start = rewind_state
            else:
                start = load_state(prev / "weights_end.safetensors")
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
            rewind_phase = (res.rewind, res.steps, None)
            for control in spec.controls:
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
                self._variant(
                    model,
                    ldir / control,
                    r,
                    level,
                    control,
                    cstart,
                    cmask,
                    rewind_phase,
                    progress=progress,
                    prior_flops=imp_flops,
                )
            begin, end, _ = self._phase(level)
            imp_flops += self.training_flops(mask, end - begin)


def lottery(model: nn.Module, data: Dataset, spec: Spec, progress=None) -> list[dict]:
    """IMP on a user's own module; later replicates re-initialise it with ``spec.init``."""
    return run_on_module(LotteryExperiment, model, data, spec, progress)


__all__ = ["LotteryExperiment", "lottery"]
