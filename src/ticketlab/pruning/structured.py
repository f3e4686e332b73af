"""Structured pruning with real removal: whole units (Linear) or channels (Conv2d) go.

A *unit group* is a set of units that are kept or removed together:

- ``producers``: the Linear/Conv2d layers whose output rows (units, channels)
  the group's units are, each with the BatchNorm that follows it, if any;
- ``consumers``: the layers that read those units as inputs (a Linear after a
  flatten reads ``h*w`` features per channel).

:func:`groups` finds them in

- a plain stack: an ``nn.Sequential`` (nested ones are flattened) of Linear,
  Conv2d, BatchNorm1d/2d, element-wise activations, dropout, pooling and
  Flatten: one group per Linear/Conv2d but the last;
- the registered ``mlp``/``lenet``, ``conv2/4/6`` and ``vgg`` models, the same
  way along their data flow;
- the registered ResNets: by default only the inner conv of each basic block
  (``conv1`` -> ``bn1`` -> ``conv2``), since the residual stream must keep the
  same channels on both sides of every addition; with ``residual=True`` also
  one shared channel group per stage stream, whose producers are the stem (or
  the stage's projection shortcut) and every block's ``conv2``, and whose
  consumers are every ``conv1`` and shortcut reading the stream, and ``fc``.

A unit mask ``{group key: bool (units,)}`` (the key is the first producer's
weight name) then

- expands (:func:`expand`) to a weight mask that zeroes the unit's rows in
  its producers and its input columns in its consumers, so the masked network
  computes as if the unit were absent whatever the activation, the BatchNorm
  shift or a residual addition do to it;
- or is removed (:func:`remove_units`): a physically smaller copy whose
  producers, BatchNorms and consumers are sliced, with the same outputs as the
  masked original.

Unit scores (higher = kept), summed over a group's producers:

- ``l1`` (Li et al. 2017, "Pruning filters for efficient ConvNets"):
  s_i = Σ |W_i|, the L1 norm of the filter (row) that produces unit i;
- ``l2``: s_i = ||W_i||_2, the filter's L2 norm;
- ``bn`` / ``bn-scale`` (Liu et al. 2017, network slimming): s_i = |γ_i| of the
  BatchNorm that follows the producer (train with an L1 penalty on γ first:
  :class:`BNL1Penalty`);
- ``redundancy``: from the eigen-spectrum of the covariance C = V Λ Vᵀ of the
  activations the consumer sees (conv: over examples and positions): with k the
  fewest components that hold ``energy`` (default 0.99) of the variance,
  s_i = Σ_{j<k} λ_j V_ij² / Σ_j λ_j, unit i's share of the principal subspace;
  units that carry little of it are redundant (this project's definition, in
  the spirit of PCA-based width selection).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..masks import Mask, prunable_weights

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
    nn.AdaptiveAvgPool2d,
    nn.Identity,
    nn.Flatten,
)
_WEIGHTED = (nn.Linear, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)

UNIT_CRITERIA = {
    "l1": "L1 norm of the filter producing the unit (Li et al. 2017)",
    "l2": "L2 norm of the filter producing the unit",
    "bn": "|gamma| of the following BatchNorm (Liu et al. 2017, network slimming)",
    "redundancy": "share of the unit in the principal subspace of the activation covariance",
}
_ALIASES = {"bn-scale": "bn"}
UNIT_ALLOCATIONS = ("layerwise", "global")


@dataclass(frozen=True)
class Group:
    """Units kept or removed together: the outputs of ``producers`` (each followed by
    the BatchNorm of the same index in ``norms``, or None), read by ``consumers``.
    Names are module names."""

    producers: tuple[str, ...]
    norms: tuple[str | None, ...]
    consumers: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.producers[0]}.weight"


BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def bn_layers(model: nn.Module) -> dict[str, nn.Module]:
    """BatchNorm layers with an affine scale, by module name, in module order."""
    return {
        n: m for n, m in model.named_modules() if isinstance(m, BN_TYPES) and m.weight is not None
    }


class BNL1Penalty:
    """Training-loop callback: adds ``s * sign(gamma)`` to every BN scale's gradient."""

    def __init__(self, s: float = 1e-4):
        if not s >= 0:
            raise UsageError(f"the L1 strength s must be >= 0; got {s}")
        self.s = s

    @torch.no_grad()
    def before_step(self, step: int, model: nn.Module, optimizer) -> None:
        for bn in bn_layers(model).values():
            if bn.weight.grad is not None:
                bn.weight.grad.add_(torch.sign(bn.weight), alpha=self.s)


def canonical_unit_criterion(how: str) -> str:
    how = _ALIASES.get(how, how)
    if how not in UNIT_CRITERIA:
        choices = ", ".join([*UNIT_CRITERIA, *_ALIASES])
        raise UsageError(f"unknown unit score '{how}'; choose from: {choices}")
    return how


def _flat(model: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in model.named_children():
        full = f"{prefix}{name}"
        out += _flat(m, full + ".") if isinstance(m, nn.Sequential) else [(full, m)]
    return out


def _chain_groups(layers: list[tuple[str, nn.Module]]) -> list[Group]:
    """Groups of a plain chain of layers in data-flow order."""
    for name, m in layers:
        ok = isinstance(m, _WEIGHTED + _BN + _PASS)
        if not ok or (isinstance(m, nn.Conv2d) and m.groups != 1):
            raise UsageError(f"structured removal cannot pass layer {name} ({type(m).__name__})")
    idx = [i for i, (_, m) in enumerate(layers) if isinstance(m, _WEIGHTED)]
    out = []
    for p, c in zip(idx[:-1], idx[1:]):
        bns = [n for n, m in layers[p + 1 : c] if isinstance(m, _BN)]
        out.append(Group((layers[p][0],), (bns[0] if bns else None,), (layers[c][0],)))
    return out


def _resnet_groups(model: nn.Module, residual: bool) -> list[Group]:
    blocks = list(model.blocks.named_children())
    out = [
        Group((f"blocks.{i}.conv1",), (f"blocks.{i}.bn1",), (f"blocks.{i}.conv2",))
        for i, _ in blocks
    ]
    if not residual:
        return out
    # one stream per stage: a projection shortcut starts a new one
    prod, norms, cons = ["conv"], ["bn"], []
    for i, b in blocks:
        pre = f"blocks.{i}"
        cons.append(f"{pre}.conv1")
        if len(b.shortcut):
            cons.append(f"{pre}.shortcut.0")
            out.append(Group(tuple(prod), tuple(norms), tuple(cons)))
            prod, norms, cons = [f"{pre}.shortcut.0"], [f"{pre}.shortcut.1"], []
        prod.append(f"{pre}.conv2")
        norms.append(f"{pre}.bn2")
    cons.append("fc")
    out.append(Group(tuple(prod), tuple(norms), tuple(cons)))
    return out


def groups(model: nn.Module, residual: bool = False) -> list[Group]:
    """The unit groups of ``model`` (see the module docstring); ``residual`` adds the
    per-stage stream groups of a ResNet."""
    from ..models.convnets import VGG, ConvNet
    from ..models.mlp import MLP
    from ..models.resnet import ResNet

    kind = type(model).__name__
    if getattr(model, "acts", None) is not None or getattr(model, "act", None) is not None:
        raise UsageError(f"structured removal does not support custom activations ({kind})")
    if isinstance(model, ResNet):
        return _resnet_groups(model, residual)
    if residual:
        raise UsageError("residual-stream pruning needs a ResNet")
    if isinstance(model, nn.Sequential):
        return _chain_groups(_flat(model))
    if isinstance(model, MLP):
        layers = [(f"hidden.{i}", m) for i, m in enumerate(model.hidden)]
        return _chain_groups([*layers, ("fc", model.fc)])
    if isinstance(model, ConvNet):
        hidden = [(f"hidden.{i}", m) for i, m in enumerate(model.hidden)]
        return _chain_groups([*_flat(model.features, "features."), *hidden, ("fc", model.fc)])
    if isinstance(model, VGG):
        return _chain_groups([*_flat(model.features, "features."), ("fc", model.fc)])
    raise UsageError(
        f"structured removal works on nn.Sequential stacks and the registered mlp, conv, "
        f"vgg and resnet models; got {kind}"
    )


def unit_layers(model: nn.Module, residual: bool = False) -> list[str]:
    """Keys (the first producer's weight name) of the groups whose units can be removed."""
    return [g.key for g in groups(model, residual)]


def _units(mods: dict, g: Group) -> int:
    n = {mods[p].weight.shape[0] for p in g.producers}
    if len(n) != 1:
        raise UsageError(f"producers of group {g.key} disagree on their unit count: {sorted(n)}")
    return n.pop()


def _columns(consumer: nn.Module, keep: torch.Tensor) -> torch.Tensor:
    """The consumer's input columns (features or channels) that belong to the kept units."""
    n_in = consumer.weight.shape[1]
    if n_in % keep.numel():
        raise UsageError("a consumer's inputs do not split evenly over the producer's units")
    return keep.repeat_interleave(n_in // keep.numel())


@torch.no_grad()
def _consumer_inputs(model: nn.Module, gs: list[Group], x: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the first consumer of each group reads, as rows (examples [x positions], units)."""
    mods = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for g in gs:
        units = _units(mods, g)

        def hook(module, args, key=g.key, units=units):
            a = args[0].double()
            if a.dim() == 4:
                a = a.transpose(0, 1).reshape(a.shape[1], -1).T
            elif a.shape[1] != units:  # a flattened conv output: C*h*w features
                a = a.reshape(a.shape[0], units, -1).transpose(1, 2).reshape(-1, units)
            seen[key] = a

        hooks.append(mods[g.consumers[0]].register_forward_pre_hook(hook))
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return seen


def unit_scores(
    model: nn.Module,
    how: str = "l1",
    x: torch.Tensor | None = None,
    energy: float = 0.99,
    residual: bool = False,
) -> dict[str, torch.Tensor]:
    """Scores per unit of each group (keyed like :func:`unit_layers`); ``x`` (examples)
    for ``redundancy``."""
    how = canonical_unit_criterion(how)
    gs = groups(model, residual)
    mods = dict(model.named_modules())
    if how == "redundancy":
        if x is None:
            raise UsageError("unit score 'redundancy' needs examples")
        if not 0.0 < energy <= 1.0:
            raise UsageError(f"energy must be in (0, 1]; got {energy}")
        acts = _consumer_inputs(model, gs, x)
    out = {}
    for g in gs:
        ws = [mods[p].weight.detach().flatten(1).double() for p in g.producers]
        _units(mods, g)
        if how == "l1":
            out[g.key] = sum(w.abs().sum(1) for w in ws).float().cpu()
        elif how == "l2":
            out[g.key] = sum(w.pow(2).sum(1) for w in ws).sqrt().float().cpu()
        elif how == "bn":
            if any(n is None or mods[n].weight is None for n in g.norms):
                raise UsageError(f"unit score 'bn' needs an affine BatchNorm after {g.key}")
            out[g.key] = sum(mods[n].weight.detach().abs() for n in g.norms).float().cpu()
        else:
            a = acts[g.key]
            a = a - a.mean(0)
            cov = a.T @ a / max(a.shape[0] - 1, 1)
            lam, vec = torch.linalg.eigh(cov)
            lam, vec = lam.flip(0).clamp_min(0.0), vec.flip(1)
            total = float(lam.sum())
            if total <= 0:
                out[g.key] = torch.zeros(len(lam))
                continue
            k = int(torch.searchsorted(torch.cumsum(lam, 0) / total, energy - 1e-12)) + 1
            out[g.key] = ((vec[:, :k] ** 2 * lam[:k]).sum(1) / total).float().cpu()
    return out


def select_units(
    scores: dict[str, torch.Tensor], density: float, allocation: str = "layerwise"
) -> dict[str, torch.Tensor]:
    """Keep-masks over the units of each group.

    ``layerwise``: the top ``max(1, round(density * n))`` units of each group;
    ``global``: the top ``round(density * total)`` units over all groups (one
    threshold, as network slimming uses on BN scales), at least one per group.
    Ties go to the lower index (and the earlier group).
    """
    if not 0.0 < density <= 1.0:
        raise UsageError(f"unit density must be in (0, 1]; got {density}")
    if allocation not in UNIT_ALLOCATIONS:
        choices = ", ".join(UNIT_ALLOCATIONS)
        raise UsageError(f"unknown unit allocation '{allocation}'; choose from: {choices}")
    out = {}
    if allocation == "layerwise":
        for k, s in scores.items():
            keep = max(1, int(round(density * s.numel())))
            order = torch.argsort(-s.double(), stable=True)
            m = torch.zeros(s.numel(), dtype=torch.bool)
            m[order[:keep]] = True
            out[k] = m
        return out
    names = list(scores)
    flat = torch.cat([scores[k].double().flatten() for k in names])
    order = torch.argsort(-flat, stable=True)
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    chosen[order[: int(round(density * flat.numel()))]] = True
    start = 0
    for k in names:
        n = scores[k].numel()
        m = chosen[start : start + n].clone()
        if not bool(m.any()):
            m[int(torch.argmax(scores[k].double()))] = True
        out[k] = m
        start += n
    return out


def _plan(model: nn.Module, keep: dict[str, torch.Tensor]) -> list[tuple[Group, torch.Tensor]]:
    by_key = {g.key: g for g in groups(model, residual=is_resnet(model))}
    unknown = [k for k in keep if k not in by_key]
    if unknown:
        raise UsageError(f"no removable units in: {', '.join(unknown)}")
    mods = dict(model.named_modules())
    out = []
    for k, m in keep.items():
        n = _units(mods, by_key[k])
        if m.shape != (n,) or m.dtype != torch.bool:
            raise UsageError(f"unit mask of {k} must be a bool tensor of shape ({n},)")
        if not bool(m.any()):
            raise UsageError(f"unit mask of {k} removes every unit")
        out.append((by_key[k], m.cpu()))
    return out


def is_resnet(model: nn.Module) -> bool:
    """Whether ``model`` is a registered ResNet (its residual stream can be pruned too)."""
    from ..models.resnet import ResNet

    return isinstance(model, ResNet)


def expand(model: nn.Module, keep: dict[str, torch.Tensor]) -> Mask:
    """The weight mask (over every prunable weight) equivalent to the unit masks ``keep``."""
    plan = _plan(model, keep)
    mods = dict(model.named_modules())
    out = {n: torch.ones(p.shape, dtype=torch.bool) for n, p in prunable_weights(model).items()}
    for g, m in plan:
        for p in g.producers:
            w = out[f"{p}.weight"]
            out[f"{p}.weight"] = w & m.view(-1, *([1] * (w.dim() - 1)))
        for c in g.consumers:
            w = out[f"{c}.weight"]
            cols = _columns(mods[c], m)
            out[f"{c}.weight"] = w & cols.view(1, -1, *([1] * (w.dim() - 2)))
    return Mask(out)


def _slice_param(module: nn.Module, name: str, idx: torch.Tensor, dim: int) -> None:
    p = getattr(module, name)
    if p is None:
        return
    new = p.detach().index_select(dim, idx.to(p.device)).clone()
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(new, requires_grad=p.requires_grad))
    else:
        setattr(module, name, new)


@torch.no_grad()
def remove_units(model: nn.Module, keep: dict[str, torch.Tensor]) -> nn.Module:
    """A physically smaller copy of ``model`` without the units ``keep`` drops.

    Its outputs equal those of the original with :func:`expand`'s mask applied.
    """
    plan = _plan(model, keep)
    net = copy.deepcopy(model)
    mods = dict(net.named_modules())
    for g, m in plan:
        idx = torch.nonzero(m).flatten()
        for p in g.producers:
            prod = mods[p]
            _slice_param(prod, "weight", idx, 0)
            _slice_param(prod, "bias", idx, 0)
            if isinstance(prod, nn.Linear):
                prod.out_features = len(idx)
            else:
                prod.out_channels = len(idx)
        for n in g.norms:
            if n is None:
                continue
            bn = mods[n]
            for attr in ("weight", "bias", "running_mean", "running_var"):
                _slice_param(bn, attr, idx, 0)
            bn.num_features = len(idx)
        for c in g.consumers:
            cons = mods[c]
            cols = torch.nonzero(_columns(cons, m)).flatten()
            _slice_param(cons, "weight", cols, 1)
            if isinstance(cons, nn.Linear):
                cons.in_features = len(cols)
            else:
                cons.in_channels = len(cols)
    return net


__all__ = [
    "BNL1Penalty",
    "bn_layers",
    "UNIT_ALLOCATIONS",
    "UNIT_CRITERIA",
    "Group",
    "canonical_unit_criterion",
    "expand",
    "groups",
    "remove_units",
    "select_units",
    "unit_layers",
    "unit_scores",
]
