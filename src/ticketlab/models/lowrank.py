"""Low-rank replacement of Linear and Conv layers: ``W`` (out x fan-in) becomes ``B A``.

A Linear layer ``out x in`` becomes ``Linear(in, r, bias=False)`` then
``Linear(r, out)``; a convolution, read as the matrix ``out x (in k_h k_w)``, becomes a
convolution with ``r`` output channels and the original kernel, stride, padding and
dilation, then a 1x1 convolution to ``out`` channels with the original bias. The pair is
an ``nn.Sequential`` at the layer's own name, so its weights are ``<layer>.0.weight``
and ``<layer>.1.weight``: the state dict says which layers are factorised and at which
rank (:func:`factorise_like` rebuilds the architecture from it). Grouped convolutions
(depthwise) are left as they are: they are not one matrix over their inputs.

From trained weights, :func:`truncated_svd` gives the best rank-``r`` approximation in
Frobenius norm (Eckart-Young): ``W = U S V^T``, ``B = U_r S_r^(1/2)``,
``A = S_r^(1/2) V_r^T``; at full rank ``r = min(out, fan-in)`` the product is ``W``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import UsageError

FACTORABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def factorable(module: nn.Module) -> bool:
    """A Linear, or a Conv over all its inputs (groups 1)."""
    return isinstance(module, FACTORABLE) and getattr(module, "groups", 1) == 1


def full_rank(module: nn.Module) -> int:
    """``min(out, fan-in)``: the rank at which the factorisation is exact."""
    w = module.weight
    return min(w.shape[0], math.prod(w.shape[1:]))


def rank_for(module: nn.Module, fraction: float) -> int:
    """The rank kept at ``fraction`` of the full rank: ``ceil(fraction * full)``, at least 1."""
    return max(1, min(full_rank(module), math.ceil(fraction * full_rank(module) - 1e-9)))


def factor_pair(module: nn.Module, rank: int) -> nn.Sequential:
    """The two layers that replace ``module`` at ``rank`` (weights of construction's init,
    drawn with the global RNG forked, so the caller's RNG is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        return _pair(module, rank)


def _pair(module: nn.Module, rank: int) -> nn.Sequential:
    w = module.weight
    kw = dict(device=w.device, dtype=w.dtype)
    bias = module.bias is not None
    if isinstance(module, nn.Linear):
        return nn.Sequential(
            nn.Linear(module.in_features, rank, bias=False, **kw),
            nn.Linear(rank, module.out_features, bias=bias, **kw),
        )
    conv = type(module)
    first = conv(
        module.in_channels,
        rank,
        module.kernel_size,
        stride=module.stride,
        padding=module.padding,
        dilation=module.dilation,
        bias=False,
        padding_mode=module.padding_mode,
        **kw,
    )
    return nn.Sequential(first, conv(rank, module.out_channels, 1, bias=bias, **kw))


def truncated_svd(weight: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """``(B, A, energy)``: ``B`` (out x r) and ``A`` (r x fan-in) with ``B A`` the best
    rank-``r`` approximation of ``weight`` read as ``out x fan-in``, and the fraction of
    the squared singular values kept. Computed in float64."""
    mat = weight.detach().reshape(weight.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    root = s[:rank].sqrt()
    b = u[:, :rank] * root
    a = root[:, None] * vh[:rank]
    total = float((s**2).sum())
    energy = float((s[:rank] ** 2).sum()) / total if total > 0 else 1.0
    return b.to(weight.dtype), a.to(weight.dtype), energy


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    head, leaf = name.rsplit(".", 1)
    return model.get_submodule(head), leaf


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, leaf = _parent(model, name)
    setattr(parent, leaf, new)
    if getattr(model, "output_layer_name", None) == name:
        model.output_layer_name = f"{name}.1"  # the last Linear: pruning rules look for it


def layer_names(model: nn.Module, skip=()) -> list[str]:
    """Module names of the layers :func:`factorise` replaces (``skip``: module names kept)."""
    return [n for n, m in model.named_modules() if n and factorable(m) and n not in set(skip)]


@torch.no_grad()
def factorise(model: nn.Module, ranks: dict[str, int], weights: bool = True) -> dict[str, float]:
    """Replace each layer named in ``ranks`` (module name -> rank) by its factor pair, in
    place. With ``weights`` the pair holds the truncated SVD of the layer's weight (and its
    bias); without, the pair keeps its construction init (initialise it afterwards).
    Returns each layer's kept energy (1.0 without ``weights``)."""
    mods = dict(model.named_modules())
    energy = {}
    for name, rank in ranks.items():
        module = mods.get(name)
        if module is None or not factorable(module):
            raise UsageError(f"'{name}' is not a Linear or ungrouped Conv layer of the model")
        if not 1 <= rank <= full_rank(module):
            raise UsageError(f"rank {rank} of '{name}' is not in [1, {full_rank(module)}]")
        pair = factor_pair(module, rank)
        energy[name] = 1.0
        if weights:
            b, a, energy[name] = truncated_svd(module.weight, rank)
            pair[0].weight.copy_(a.reshape(pair[0].weight.shape))
            pair[1].weight.copy_(b.reshape(pair[1].weight.shape))
            if module.bias is not None:
                pair[1].bias.copy_(module.bias)
        _replace(model, name, pair)
    return energy


def factorised_ranks(state: dict[str, Tensor]) -> dict[str, int]:
    """The factorised layers a state dict holds (module name -> rank): those with
    ``<layer>.0.weight`` and ``<layer>.1.weight`` but no ``<layer>.weight``."""
    out = {}
    for key, t in state.items():
        if key.endswith(".0.weight"):
            name = key[: -len(".0.weight")]
            if f"{name}.1.weight" in state and f"{name}.weight" not in state:
                out[name] = int(t.shape[0])
    return out


def factorise_like(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """``model`` with the layers that ``state`` holds factorised replaced, at its ranks."""
    mods = dict(model.named_modules())
    ranks = {n: r for n, r in factorised_ranks(state).items() if n in mods and factorable(mods[n])}
    if ranks:
        factorise(model, ranks, weights=False)
    return model


__all__ = [
    "factor_pair",
    "factorable",
    "factorise",
    "factorise_like",
    "factorised_ranks",
    "full_rank",
    "layer_names",
    "rank_for",
    "truncated_svd",
]
