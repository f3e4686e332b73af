"""Structured pruning with real removal: whole units (Linear) or channels (Conv2d) go.

Works on a plain stack, an ``nn.Sequential`` (nested ones are flattened) of
Linear, Conv2d, BatchNorm1d/2d, element-wise activations, dropout, pooling and
Flatten. A *unit* of a Linear or Conv2d layer (a row of its weight, a channel)
that is not the last such layer is scored by one of :data:`UNIT_CRITERIA`; a
unit mask ``{producer weight name: bool (units,)}`` then

- expands (:func:`expand`) to a weight mask that zeroes the unit's row in its
  producer and its input columns in the next Linear/Conv2d (the consumer), so
  the masked network computes as if the unit were absent whatever the
  activation or the BatchNorm shift do to it;
- or is removed (:func:`remove_units`): a physically smaller copy whose
  producer, BatchNorm and consumer are sliced, with the same outputs as the
  masked original.

Unit scores (higher = kept):

- ``l1`` (Li et al. 2017, "Pruning filters for efficient ConvNets"):
  s_i = Σ |W_i|, the L1 norm of the filter (row) that produces unit i;
- ``bn`` (Liu et al. 2017, network slimming): s_i = |γ_i| of the BatchNorm that
  follows the producer;
- ``redundancy``: from the eigen-spectrum of the covariance C = V Λ Vᵀ of the
  activations the consumer sees (conv: over examples and positions): with k the
  fewest components that hold ``energy`` (default 0.99) of the variance,
  s_i = Σ_{j<k} λ_j V_ij² / Σ_j λ_j, unit i's share of the principal subspace;
  units that carry little of it are redundant (this project's definition, in
  the spirit of PCA-based width selection).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import UsageError
from ..masks import Mask

_PASS = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Tanh,
    nn.Sigmoid,
    nn.GELU,
    nn.ELU,
    nn.SiLU,
    nn.Dropout,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Identity,
)
_WEIGHTED = (nn.Linear, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def _flat(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise UsageError("structured removal needs an nn.Sequential stack")
    out = []
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        out += _flat(m, full + ".") if isinstance(m, nn.Sequential) else [(full, m)]
    return out


def _pairs(model: nn.Module) -> list[tuple[int, int]]:
    """(producer index, consumer index) in the flattened stack, for every prunable unit layer."""
    layers = _flat(model)
    for name, m in layers:
        ok = isinstance(m, _WEIGHTED + _BN + _PASS + (nn.Flatten,))
        if not ok or (isinstance(m, nn.Conv2d) and m.groups != 1):
            raise UsageError(f"structured removal cannot pass layer {name} ({type(m).__name__})")
    idx = [i for i, (_, m) in enumerate(layers) if isinstance(m, _WEIGHTED)]
    return list(zip(idx[:-1], idx[1:]))


def unit_layers(model: nn.Module) -> list[str]:
    """Weight names of the layers whose units can be removed (all but the last)."""
    layers = _flat(model)
    return [f"{layers[p][0]}.weight" for p, _ in _pairs(model)]


def _bn_after(layers, p: int, c: int):
    bns = [m for _, m in layers[p + 1 : c] if isinstance(m, _BN)]
    return bns[0] if bns else None


@torch.no_grad()
def _activations(model: nn.Module, x: torch.Tensor) -> dict[int, torch.Tensor]:
    """Inputs of each consumer, as rows (examples [x positions], units), float64."""
    layers = _flat(model)
    consumers = {c: p for p, c in _pairs(model)}
    out = {}
    h = x
    for i, (_, m) in enumerate(layers):
        if i in consumers:
            p = consumers[i]
            a = h.double()
            if a.dim() == 4:
                a = a.transpose(0, 1).reshape(a.shape[1], -1).T
            elif isinstance(layers[p][1], nn.Conv2d):  # flattened conv output
                c = layers[p][1].out_channels
                a = a.reshape(a.shape[0], c, -1).transpose(1, 2).reshape(-1, c)
            out[p] = a
        h = m(h)
    return out


def unit_scores(
    model: nn.Module, how: str = "l1", x: torch.Tensor | None = None, energy: float = 0.99
) -> dict[str, torch.Tensor]:
    """Scores per unit of each :func:`unit_layers` layer; ``x`` (examples) for ``redundancy``."""
    if how not in UNIT_CRITERIA:
        raise UsageError(f"unknown unit score '{how}'; choose from: {', '.join(UNIT_CRITERIA)}")
    layers = _flat(model)
    pairs = _pairs(model)
    out = {}
    if how == "redundancy":
        if x is None:
            raise UsageError("unit score 'redundancy' needs examples")
        if not 0.0 < energy <= 1.0:
            raise UsageError(f"energy must be in (0, 1]; got {energy}")
        was = model.training
        model.eval()
        try:
            acts = _activations(model, x)
        finally:
            model.train(was)
    for p, c in pairs:
        name, m = layers[p]
        key = f"{name}.weight"
        if how == "l1":
            out[key] = m.weight.detach().abs().flatten(1).sum(1).cpu()
        elif how == "bn":
            bn = _bn_after(layers, p, c)
            if bn is None or bn.weight is None:
                raise UsageError(f"unit score 'bn' needs an affine BatchNorm after {name}")
            out[key] = bn.weight.detach().abs().cpu()
        else:
            a = acts[p]
            a = a - a.mean(0)
            cov = a.T @ a / max(a.shape[0] - 1, 1)
            lam, vec = torch.linalg.eigh(cov)
            lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
            total = float(lam.sum())
            if total <= 0:
                out[key] = torch.zeros(len(lam))
                continue
            k = int(torch.searchsorted(torch.cumsum(lam, 0) / total, energy - 1e-12)) + 1
            out[key] = ((vec[:, :k] ** 2 * lam[:k]).sum(1) / total).float().cpu()
    return out


UNIT_CRITERIA = {
    "l1": "L1 norm of the filter producing the unit (Li et al. 2017)",
    "bn": "|gamma| of the following BatchNorm (Liu et al. 2017, network slimming)",
    "redundancy": "share of the unit in the principal subspace of the activation covariance",
}


def select_units(scores: dict[str, torch.Tensor], density: float) -> dict[str, torch.Tensor]:
    """Keep the top ``max(1, round(density * n))`` units of each layer (ties: lower index)."""
    if not 0.0 < density <= 1.0:
        raise UsageError(f"unit density must be in (0, 1]; got {density}")
    out = {}
    for k, s in scores.items():
        keep = max(1, int(round(density * s.numel())))
        order = torch.argsort(-s.double(), stable=True)
        m = torch.zeros(s.numel(), dtype=torch.bool)
        m[order[:keep]] = True
        out[k] = m
    return out


def _check_keep(model, keep) -> dict[int, tuple[int, torch.Tensor]]:
    layers = _flat(model)
    by_name = {f"{layers[p][0]}.weight": (p, c) for p, c in _pairs(model)}
    unknown = [k for k in keep if k not in by_name]
    if unknown:
        raise UsageError(f"no removable units in: {', '.join(unknown)}")
    out = {}
    for k, m in keep.items():
        p, c = by_name[k]
        n = layers[p][1].weight.shape[0]
        if m.shape != (n,) or m.dtype != torch.bool:
            raise UsageError(f"unit mask of {k} must be a bool tensor of shape ({n},)")
        if not bool(m.any()):
            raise UsageError(f"unit mask of {k} removes every unit")
        out[p] = (c, m)
    return out


def _columns(consumer: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """The consumer's input columns (features or channels) that belong to the kept units."""
    n_in = consumer.weight.shape[1]
    if n_in % keep.numel():
        raise UsageError("a consumer's inputs do not split evenly over the producer's units")
    return keep.repeat_interleave(n_in // keep.numel())


def expand(model: nn.Module, keep: dict[str, torch.Tensor]) -> Mask:
    """The weight mask (over every Linear/Conv weight of the stack) equivalent to ``keep``."""
    layers = _flat(model)
    plan = _check_keep(model, keep)
    out = {f"{n}.weight": torch.ones(m.weight.shape, dtype=torch.bool) for n, m in layers
           if isinstance(m, _WEIGHTED)}  # fmt: skip
    for p, (c, m) in plan.items():
        pw = f"{layers[p][0]}.weight"
        cw = f"{layers[c][0]}.weight"
        out[pw] &= m.view(-1, *([1] * (out[pw].dim() - 1)))
        cols = _columns(layers[c][1], m)
        out[cw] &= cols.view(1, -1, *([1] * (out[cw].dim() - 2)))
    return Mask(out)


@torch.no_grad()
def remove_units(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Sequential:
    """A physically smaller copy of the stack without the units ``keep`` drops.

    Its outputs equal those of the original with :func:`expand`'s mask applied.
    """
    plan = _check_keep(model, keep)
    net = copy.deepcopy(model)
    layers = _flat(net)
    for p, (c, m) in plan.items():
        idx = torch.nonzero(m).flatten()
        prod = layers[p][1]
        prod.weight = nn.Parameter(prod.weight[idx].clone())
        if prod.bias is not None:
            prod.bias = nn.Parameter(prod.bias[idx].clone())
        if isinstance(prod, nn.Linear):
            prod.out_features = len(idx)
        else:
            prod.out_channels = len(idx)
        bn = _bn_after(layers, p, c)
        if bn is not None:
            if bn.weight is not None:
                bn.weight = nn.Parameter(bn.weight[idx].clone())
                bn.bias = nn.Parameter(bn.bias[idx].clone())
            if bn.running_mean is not None:
                bn.running_mean = bn.running_mean[idx].clone()
                bn.running_var = bn.running_var[idx].clone()
            bn.num_features = len(idx)
        cons = layers[c][1]
        cols = torch.nonzero(_columns(cons, m)).flatten()
        cons.weight = nn.Parameter(cons.weight[:, cols].clone())
        if isinstance(cons, nn.Linear):
            cons.in_features = len(cols)
        else:
            cons.in_channels = len(cols)
    return net


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def compression(original: nn.Module, smaller: nn.Module) -> float:
    """Parameter count ratio original / smaller."""
    return parameter_count(original) / max(parameter_count(smaller), 1)


__all__ = [
    "UNIT_CRITERIA",
    "compression",
    "expand",
    "parameter_count",
    "remove_units",
    "select_units",
    "unit_layers",
    "unit_scores",
]
