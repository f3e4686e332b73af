"""Score, then allocate, then select: one pruning step.

A criterion maps ``(model, mask, context)`` to scores per prunable weight;
higher score = kept. Allocation decides how many weights each layer loses:
``layerwise`` removes the fraction from each layer's remaining weights,
``global`` ranks the layers that share a fraction together. Pruned weights never
come back: their scores are -inf.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import UsageError
from .masks import Mask, layer_kinds, prunable_weights


def magnitude_scores(model: nn.Module, mask: Mask, generator=None) -> dict[str, torch.Tensor]:
    """|w| (Han et al. 2015; Frankle & Carbin 2019)."""
    weights = prunable_weights(model)
    return {k: weights[k].detach().abs() for k in mask.names()}


def random_scores(model: nn.Module, mask: Mask, generator=None) -> dict[str, torch.Tensor]:
    """Uniform random scores: the random-pruning baseline."""
    return {k: torch.rand(m.shape, generator=generator) for k, m in mask.items()}


CRITERIA = {"magnitude": magnitude_scores, "random": random_scores}


def layer_fractions(
    model: nn.Module,
    mask: Mask,
    fraction: float,
    conv_fraction: float | None = None,
    output_fraction: float | None = None,
    dense: tuple[str, ...] | list[str] = (),
) -> dict[str, float]:
    """The per-level pruning fraction of each masked layer, by its kind.

    ``dense`` names layers (parameter or module names) left unpruned; the words
    ``first`` and ``output`` name the first prunable and the output layer.
    """
    kinds = layer_kinds(model)
    names = mask.names()
    skip = set()
    for d in dense:
        if d == "output":
            skip |= {n for n in names if kinds.get(n) == "output"}
        elif d == "first":
            skip.add(names[0])
        else:
            hit = [n for n in names if n == d or n == f"{d}.weight"]
            if not hit:
                raise UsageError(
                    f"dense layer '{d}' is not a prunable weight; choose from: "
                    f"first, output, {', '.join(names)}"
                )
            skip |= set(hit)
    out = {}
    for n in names:
        kind = kinds.get(n, "fc")
        if n in skip:
            f = 0.0
        elif kind == "conv":
            f = conv_fraction if conv_fraction is not None else fraction
        elif kind == "output":
            f = output_fraction if output_fraction is not None else fraction
        else:
            f = fraction
        out[n] = f
    return out


def _select(scores: torch.Tensor, keep: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Drop the ``n_prune`` lowest-scored kept entries of a flat tensor."""
    new = keep.clone()
    if n_prune <= 0:
        return new
    inf = torch.full_like(scores, float("inf"), dtype=torch.double)
    s = torch.where(keep, scores.double(), inf)
    # stable sort: ties go to the lower index first, so the result is deterministic
    order = torch.argsort(s, stable=True)
    new[order[:n_prune]] = False
    return new


def prune(
    model: nn.Module,
    mask: Mask,
    fractions: dict[str, float] | float,
    scope: str = "layerwise",
    criterion: str = "magnitude",
    scores: dict[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
) -> Mask:
    """A new mask with ``fractions`` of each layer's remaining weights removed.

    ``fractions`` is one number for every layer or a per-layer dict (see
    :func:`layer_fractions`). The number removed from n remaining weights is
    ``round(f * n)``, so after k levels a layer keeps about ``(1 - f)^k``.
    """
    if criterion not in CRITERIA and scores is None:
        raise UsageError(f"unknown criterion '{criterion}'; choose from: {', '.join(CRITERIA)}")
    if scope not in ("layerwise", "global"):
        raise UsageError(f"unknown scope '{scope}'; choose from: global, layerwise")
    if not isinstance(fractions, dict):
        fractions = {n: float(fractions) for n in mask.names()}
    for n, f in fractions.items():
        if not 0.0 <= f < 1.0:
            raise UsageError(f"prune fraction for {n} must be in [0, 1); got {f}")
    if scores is None:
        scores = CRITERIA[criterion](model, mask, generator)
    new = {}
    if scope == "layerwise":
        for n in mask.names():
            keep = mask[n].flatten()
            n_prune = int(round(fractions[n] * int(keep.sum())))
            new[n] = _select(scores[n].flatten().cpu(), keep, n_prune).view_as(mask[n])
        return Mask(new)
    # global: layers that share a fraction are ranked together
    groups: dict[float, list[str]] = {}
    for n in mask.names():
        groups.setdefault(fractions[n], []).append(n)
    for f, names in groups.items():
        keep = torch.cat([mask[n].flatten() for n in names])
        flat = torch.cat([scores[n].flatten().cpu().double() for n in names])
        n_prune = int(round(f * int(keep.sum())))
        chosen = _select(flat, keep, n_prune)
        offset = 0
        for n in names:
            size = mask[n].numel()
            new[n] = chosen[offset : offset + size].view_as(mask[n])
            offset += size
    return Mask({n: new[n] for n in mask.names()})
