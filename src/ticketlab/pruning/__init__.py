"""Score, then allocate, then select: pruning.

A criterion maps ``(model, mask, context)`` to scores per prunable weight;
higher score = kept (:mod:`.criteria`). Allocation decides how many weights
each layer keeps or loses (:mod:`.allocation`): per-level fractions for IMP
(:func:`prune`, ``layerwise`` or ``global``) and one-shot densities
(:func:`select`: ``global``, ``layerwise``, ``er``, ``erk``, explicit).
Pruned weights never come back: their scores are -inf.
"""

from __future__ import annotations

from .allocation import (
    ALLOCATIONS,
    erk_densities,
    layer_densities,
    layer_fractions,
    prune,
    select,
)
from .criteria import (
    CRITERIA,
    Context,
    criterion_names,
    fisher_scores,
    grasp_scores,
    invert_scores,
    magnitude_scores,
    obd_scores,
    random_scores,
    score,
    snip_scores,
    synflow_scores,
    taylor_scores,
)

__all__ = [
    "ALLOCATIONS",
    "CRITERIA",
    "Context",
    "criterion_names",
    "erk_densities",
    "fisher_scores",
    "grasp_scores",
    "invert_scores",
    "layer_densities",
    "layer_fractions",
    "magnitude_scores",
    "obd_scores",
    "prune",
    "random_scores",
    "score",
    "select",
    "snip_scores",
    "synflow_scores",
    "taylor_scores",
]
