"""Rebuild a trained network from a run directory: :func:`load_model`.

A run stores weights, not modules (nothing is unpickled from disk). The run's
``spec.json`` names the model, its width and the dataset, whose input shape and
class count fix the architecture; a variant's ``weights_end`` (or
``weights_start``) file holds every parameter and buffer. Where those weights
are smaller than the model the spec builds (``structured`` pruning, early-bird
channel tickets), the missing units are removed first, so the network returned
is the physically smaller one; where they hold factorised layers (``lowrank``:
``<layer>.0.weight`` and ``<layer>.1.weight`` in place of ``<layer>.weight``), those
layers are replaced by their factor pairs at the stored ranks. The variant's mask,
where it stored one, is applied, so pruned weights are exactly zero.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .masks import Mask
from .runs import read_json

PREFERRED = ("ticket", "finetune")  # the network a method is about, where it has one


def _levels(rdir: Path) -> list[int]:
    found = (re.fullmatch(r"level-(\d+)", p.name) for p in rdir.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def _variant_dir(run: Path, replicate: int, level: int | None, variant: str | None) -> Path:
    rdir = run / f"replicate-{replicate}"
    if not rdir.is_dir():
        have = sorted(p.name for p in run.glob("replicate-*"))
        raise UsageError(f"{run} has no replicate {replicate}; it has: {', '.join(have) or 'none'}")
    levels = _levels(rdir)
    if level is None:  # the last level, or the last that holds the variant asked for
        have = [k for k in levels if variant is None or (rdir / f"level-{k}" / variant).is_dir()]
        if not have:
            what = "no levels yet" if not levels else f"no variant '{variant}' at any level"
            raise UsageError(f"{rdir} holds {what}")
        level = have[-1]
    ldir = rdir / f"level-{level}"
    if level not in levels:
        raise UsageError(f"{rdir} has no level {level}; choose from: {', '.join(map(str, levels))}")
    variants = sorted(p.name for p in ldir.iterdir() if p.is_dir())
    if variant is None:
        ranked = [v for v in PREFERRED if v in variants] + [v for v in variants if v != "dense"]
        variant = (ranked or variants or [None])[0]
        if variant is None:
            raise UsageError(f"{ldir} holds no trained network")
    if variant not in variants:
        raise UsageError(f"{ldir} has no variant '{variant}'; choose from: {', '.join(variants)}")
    return ldir / variant


def _shrunk_to(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with units removed so that its shapes are those of ``state``."""
    from .pruning.structured import groups, is_resnet, remove_units

    own = model.state_dict()
    if all(own[k].shape == v.shape for k, v in state.items() if k in own):
        return model  # nothing removed (and models structured pruning does not know load)
    mods = dict(model.named_modules())
    keep = {}
    for g in groups(model, residual=is_resnet(model)):
        name = f"{g.producers[0]}.weight"
        if name not in state:
            continue
        have, want = mods[g.producers[0]].weight.shape[0], state[name].shape[0]
        if want < have:  # which units were kept does not matter: every value is loaded next
            keep[g.key] = torch.arange(have) < want
    return remove_units(model, keep) if keep else model


def load_model(
    run_dir: str | Path,
    replicate: int = 0,
    level: int | None = None,
    variant: str | None = None,
    weights: str = "end",
) -> nn.Module:
    """The network a run trained, with its weights, in eval mode.

    ``level`` defaults to the last level the replicate reached; ``variant`` to
    the one the method is about (``ticket``, ``finetune``; else the first that
    is not ``dense``). ``weights`` is ``end`` (after training) or ``start``.
    Runs on a user's own module or data cannot be rebuilt from their spec:
    build the module and load its weights with ``load_state_dict``.
    """
    from .data.registry import DATASETS
    from .models import build
    from .models.lowrank import factorise_like
    from .runs import load_state

    run = Path(run_dir)
    if weights not in ("end", "start"):
        raise UsageError(f"weights must be 'end' or 'start'; got {weights!r}")
    if not (run / "spec.json").exists():
        raise UsageError(f"{run_dir} is not a run directory (no spec.json there)")
    stored = read_json(run / "spec.json")
    spec, ident = stored["spec"], stored.get("identity", {})
    # a user's module or data is named in the identity by what it is, not by a registry name
    if ident.get("model", spec["model"]) != spec["model"]:
        raise UsageError(f"{run_dir} trained a module of the user's own; build it and load weights")
    if ident.get("dataset", spec["dataset"]) != spec["dataset"] or spec["dataset"] not in DATASETS:
        raise UsageError(f"{run_dir} trained on the user's own data; its input shape is unknown")
    vdir = _variant_dir(run, replicate, level, variant)
    path = vdir / f"weights_{weights}.safetensors"
    if not path.exists():
        raise UsageError(f"{vdir} has no {path.name} (unfinished, or no network kept there)")
    info = DATASETS[spec["dataset"]]
    model = build(spec["model"], info.input_shape, info.num_classes, spec["width"], spec["init"])
    state = load_state(path)
    model = _shrunk_to(model, state)
    model = factorise_like(model, state)
    own = model.state_dict()
    extra, missing = sorted(set(state) - set(own)), sorted(set(own) - set(state))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if extra or missing or wrong:
        what = (
            f"unexpected {', '.join(extra[:3])}"
            if extra
            else f"missing {', '.join(missing[:3])}"
            if missing
            else f"other shapes of {', '.join(sorted(wrong)[:3])}"
        )
        raise UsageError(
            f"{path} does not fit a plain {spec['model']} ({what}); "
            "networks that keep scores or other state beside their weights cannot be rebuilt"
        )
    model.load_state_dict(state)
    if (vdir / "mask.safetensors").exists():
        mask = Mask.load(vdir / "mask.safetensors")
        # an early-bird channel ticket's mask is over the original shapes: its removed
        # units are gone already, so there is nothing left to zero
        if all(k in own and own[k].shape == m.shape for k, m in mask.items()):
            mask.apply_(model)
    return model.eval()
