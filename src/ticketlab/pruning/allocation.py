"""Allocation: how a pruning target is spread over layers, and selection by score.

Two vocabularies:

- one-shot targets: a density D over all masked weights, spread by ``global``
  (one ranking of all scores), ``layerwise`` (every layer at D), ``er`` / ``erk``
  (Evci et al. 2020), or explicit per-layer densities; layers may be kept dense.
  :func:`layer_densities` gives the per-layer densities, :func:`select` the mask.
- per-level fractions (IMP): :func:`layer_fractions` and :func:`prune` remove a
  fraction of each layer's remaining weights, layerwise or globally.

Pruned weights never come back: their scores are -inf.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError
from ..masks import Mask, layer_kinds

ALLOCATIONS = ("global", "layerwise", "er", "erk")
ALIASES = {"uniform": "layerwise"}


def canonical_allocation(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ALLOCATIONS:
        raise UsageError(f"unknown allocation '{name}'; choose from: {', '.join(ALLOCATIONS)}")
    return name


def dense_names(names: list[str], dense, kinds: dict[str, str] | None = None) -> set[str]:
    """The masked layers named by ``dense``: parameter or module names, ``first``, ``output``."""
    skip: set[str] = set()
    for d in dense:
        if d == "output":
            if kinds is None:
                raise UsageError("'output' as a dense layer needs the model")
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
    return skip


def explicit_densities(items, model: nn.Module) -> dict[str, float]:
    """``("first=0.5", "fc=0.2", ...)`` as ``{weight name: density}``: a layer is named
    as in ``dense_names`` (``first``, ``output``, a module or parameter name)."""
    names = Mask.dense(model).names()
    kinds = layer_kinds(model)
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        try:
            density = float(value)
        except ValueError:
            density = None
        if not sep or density is None:
            raise UsageError(f"layer density must be NAME=DENSITY (e.g. first=0.5); got {item!r}")
        for n in dense_names(names, (key.strip(),), kinds):
            out[n] = density
    return out


# one-shot targets ------------------------------------------------------------------------------


def _check_density(density: float) -> None:
    if not isinstance(density, (int, float)) or not 0.0 < float(density) < 1.0:
        raise UsageError(f"density must be in (0, 1); got {density}")


def erk_raw(shape: tuple[int, ...], kernel: bool = True) -> float:
    """Evci et al. 2020: (n_in + n_out [+ k_h + k_w]) / (n_in * n_out [* k_h * k_w]).

    ``kernel=False`` is ER (the kernel dimensions are left out).
    """
    n_out, n_in = shape[0], shape[1] if len(shape) > 1 else 1
    ks = list(shape[2:]) if kernel else []
    return (n_in + n_out + sum(ks)) / (n_in * n_out * math.prod(ks))


def erk_densities(
    shapes: dict[str, tuple[int, ...]],
    density: float,
    dense: set[str] | frozenset = frozenset(),
    kernel: bool = True,
) -> dict[str, float]:
    """ER/ERK densities whose parameter-weighted mean is ``density``.

    Layer i gets eps * raw_i; a layer whose density would exceed 1 is capped at
    1 (kept dense) and eps is solved again for the rest, until none exceeds 1.
    """
    _check_density(density)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    total = sum(sizes.values())
    raw = {n: erk_raw(s, kernel) for n, s in shapes.items()}
    capped = set(dense)
    while True:
        budget = density * total - sum(sizes[n] for n in capped)
        free = [n for n in shapes if n not in capped]
        if not free:
            raise UsageError(f"density {density} cannot be reached: every layer is dense")
        if budget <= 0:
            raise UsageError(
                f"density {density} cannot be reached with the dense layers "
                f"({', '.join(sorted(capped))})"
            )
        eps = budget / sum(raw[n] * sizes[n] for n in free)
        over = [n for n in free if eps * raw[n] > 1.0]
        if not over:
            break
        capped |= set(over)
    return {n: 1.0 if n in capped else eps * raw[n] for n in shapes}


def layer_densities(
    target: nn.Module | Mask,
    density: float,
    allocation: str = "layerwise",
    dense=(),
    explicit: dict[str, float] | None = None,
    model: nn.Module | None = None,
) -> dict[str, float]:
    """Per-layer densities for ``layerwise``, ``er``, ``erk`` or ``explicit`` ones.

    ``target`` is a model (its prunable weights) or a mask. Layers in ``dense``
    keep density 1 and the others make up the difference, so the weighted mean
    is ``density``. ``explicit`` gives densities by name; unnamed layers then
    share the remaining budget uniformly.
    """
    mask = target if isinstance(target, Mask) else Mask.dense(target)
    model = target if isinstance(target, nn.Module) else model
    kinds = layer_kinds(model) if model is not None else None
    names = mask.names()
    skip = dense_names(names, dense, kinds)
    shapes = {n: tuple(mask[n].shape) for n in names}
    _check_density(density)
    if explicit:
        unknown = [k for k in explicit if k not in names]
        if unknown:
            raise UsageError(f"densities for unknown layers: {', '.join(unknown)}")
        for k, v in explicit.items():
            if not 0.0 < v <= 1.0:
                raise UsageError(f"density of {k} must be in (0, 1]; got {v}")
        skip |= {k for k, v in explicit.items() if v == 1.0}
        fixed = {k: float(v) for k, v in explicit.items()}
    else:
        fixed = {}
    allocation = canonical_allocation(allocation)
    if allocation in ("er", "erk") and not fixed:
        return erk_densities(shapes, density, skip, kernel=allocation == "erk")
    if allocation == "global" and not fixed:
        raise UsageError("global allocation depends on the scores; use select()")
    sizes = {n: mask[n].numel() for n in names}
    out = {n: 1.0 for n in skip}
    out.update(fixed)
    rest = [n for n in names if n not in out]
    if not rest:
        return {n: out[n] for n in names}
    budget = density * sum(sizes.values()) - sum(out[n] * sizes[n] for n in out)
    d = budget / sum(sizes[n] for n in rest)
    if not 0.0 < d <= 1.0:
        raise UsageError(
            f"density {density} cannot be reached: the other layers would need density {d:.4g}"
        )
    out.update({n: d for n in rest})
    return {n: out[n] for n in names}


def _top(scores: torch.Tensor, keep: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` highest-scored entries among ``keep`` of a flat tensor (ties: lower index).

    -inf (a removed weight) comes after every finite score, so it is picked only
    when no finite one is left; a NaN score is refused, since it ranks nothing.
    """
    if bool(torch.isnan(scores[keep]).any()):
        raise UsageError("scores contain NaN (diverged weights?); nothing can be ranked")
    s = torch.where(keep, scores.double(), torch.full_like(scores, -math.inf, dtype=torch.double))
    order = torch.argsort(-s, stable=True)
    new = torch.zeros_like(keep)
    new[order[: max(k, 0)]] = True
    return new & keep


def select(
    scores: dict[str, torch.Tensor],
    mask: Mask,
    density: float,
    allocation: str = "global",
    dense=(),
    explicit: dict[str, float] | None = None,
    model: nn.Module | None = None,
) -> Mask:
    """The mask keeping the highest scores at ``density`` of all masked weights.

    ``global`` ranks all non-dense layers together and keeps
    ``round(density * total)`` weights in all (dense layers and layers at an
    ``explicit`` density of their own included); the other allocations keep
    ``round(d_i * n_i)`` in each layer. Weights ``mask`` already
    removed stay removed.
    """
    _check_density(density)
    allocation = canonical_allocation(allocation)
    names = mask.names()
    missing = [n for n in names if n not in scores]
    if missing:
        raise UsageError(f"no scores for: {', '.join(missing)}")
    # ranked on the CPU (the same choice on every device); the mask goes back where it was
    device, mask = mask.device, mask.to("cpu")
    if allocation == "global":
        kinds = layer_kinds(model) if model is not None else None
        skip = dense_names(names, dense, kinds)
        fixed = {n: float(d) for n, d in (explicit or {}).items() if n not in skip}
        for n, d in fixed.items():
            if n not in names:
                raise UsageError(f"densities for unknown layers: {n}")
            if not 0.0 < d <= 1.0:
                raise UsageError(f"density of {n} must be in (0, 1]; got {d}")
        rest = [n for n in names if n not in skip and n not in fixed]
        k = int(round(density * mask.num_total())) - sum(int(mask[n].sum()) for n in skip)
        k -= sum(int(round(d * mask[n].numel())) for n, d in fixed.items())
        if k <= 0 or not rest:
            raise UsageError(
                f"density {density} cannot be reached with the dense and fixed-density layers"
            )
        flat = torch.cat([scores[n].detach().flatten().cpu().double() for n in rest])
        keep = torch.cat([mask[n].flatten() for n in rest])
        chosen = _top(flat, keep, k)
        out, offset = {n: mask[n].clone() for n in skip}, 0
        for n, d in fixed.items():
            kn = int(round(d * mask[n].numel()))
            out[n] = _top(scores[n].detach().flatten().cpu(), mask[n].flatten(), kn)
            out[n] = out[n].view_as(mask[n])
        for n in rest:
            size = mask[n].numel()
            out[n] = chosen[offset : offset + size].view_as(mask[n])
            offset += size
        return Mask({n: out[n] for n in names}).to(device)
    dens = layer_densities(mask, density, allocation, dense, explicit, model)
    out = {}
    for n in names:
        k = int(round(dens[n] * mask[n].numel()))
        out[n] = _top(scores[n].detach().flatten().cpu(), mask[n].flatten(), k).view_as(mask[n])
    return Mask(out).to(device)


# per-level fractions (IMP) -----------------------------------------------------------------------


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
    skip = dense_names(names, dense, kinds)
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
    context=None,
) -> Mask:
    """A new mask with ``fractions`` of each layer's remaining weights removed.

    ``fractions`` is one number for every layer or a per-layer dict (see
    :func:`layer_fractions`). The number removed from n remaining weights is
    ``round(f * n)``, so after k levels a layer keeps about ``(1 - f)^k``.
    ``context`` (a :class:`~ticketlab.pruning.criteria.Context`) is passed to
    criteria that need data; by default it carries only ``generator``.
    """
    from .criteria import CRITERIA, Context

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
        ctx = context if context is not None else Context(generator=generator)
        scores = CRITERIA[criterion](model, mask, ctx)
    # ranked on the CPU (the same choice on every device); the mask goes back where it was
    device, mask = mask.device, mask.to("cpu")
    new = {}
    if scope == "layerwise":
        for n in mask.names():
            keep = mask[n].flatten()
            n_prune = int(round(fractions[n] * int(keep.sum())))
            new[n] = _select(scores[n].flatten().cpu(), keep, n_prune).view_as(mask[n])
        return Mask(new).to(device)
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
    return Mask({n: new[n] for n in mask.names()}).to(device)


# random masks at a distribution (sparse training from scratch)
DISTRIBUTIONS = ("uniform", "er", "erk")


def allocation_of(distribution: str) -> str:
    """The allocation a sparse-training distribution name means."""
    return canonical_allocation(distribution)  # uniform -> layerwise


def random_sparse_mask(
    model: nn.Module,
    density: float,
    distribution: str = "erk",
    first_dense: bool = False,
    generator: torch.Generator | None = None,
) -> Mask:
    """A random mask keeping round(d_i n_i) weights of each layer, d_i from the distribution."""
    dense = Mask.dense(model)
    scores = {n: torch.rand(m.shape, generator=generator) for n, m in dense.items()}
    skip = ("first",) if first_dense else ()
    return select(scores, dense, density, allocation_of(distribution), skip, model=model)


def fixed_fan_in_mask(
    model: nn.Module,
    density: float,
    distribution: str = "uniform",
    first_dense: bool = False,
    generator: torch.Generator | None = None,
) -> Mask:
    """A random mask in which every output unit of a layer keeps the same number of inputs
    (Ahmad & Scheinkman 2019's sparse weights): ``fan_in - round((1 - d_i) fan_in)``, at
    least 1, with d_i the layer's density from the distribution and fan_in a row of the
    weight (for a conv, an output channel's in_channels x kh x kw). Each unit draws its
    inputs uniformly without replacement; one ``generator`` draw per layer, in order."""
    dense = Mask.dense(model)
    skip = ("first",) if first_dense else ()
    dens = layer_densities(model, density, allocation_of(distribution), skip)
    out = {}
    for name, m in dense.items():
        rows, fan_in = m.shape[0], m[0].numel()
        keep = max(1, fan_in - round((1.0 - dens[name]) * fan_in))
        order = torch.rand(rows, fan_in, generator=generator).argsort(dim=1)
        flat = torch.zeros(rows, fan_in, dtype=torch.bool)
        flat.scatter_(1, order[:, :keep], True)
        out[name] = flat.view_as(m)
    return Mask(out).to(dense.device)
