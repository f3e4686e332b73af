"""What the surviving weights start from before (re)training.

The protocols of Renda et al. 2020 for a network trained for T steps:
weight rewinding to step k (k = 0 is the original lottery ticket), fine-tuning
and LR rewinding (both start from the final weights); and the controls of
Frankle & Carbin 2019 and Zhou et al. 2019, applied on the same mask: random
reinitialisation, reshuffling the surviving initial values within each layer,
signed constant (sign of the initial weight times the layer's init std), and a
random mask with the same layerwise densities.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import Mask
from .models import initialize, layer_init_std

State = dict[str, torch.Tensor]


def snapshot(model: nn.Module) -> State:
    """A detached copy of the full state dict (weights, biases, BN buffers)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@torch.no_grad()
def rewind(model: nn.Module, state: State, mask: Mask | None = None) -> nn.Module:
    """Load ``state`` into ``model`` and zero the pruned weights."""
    model.load_state_dict(state)
    if mask is not None:
        mask.apply_(model)
    return model


def random_reinit(model: nn.Module, init: str, seed: int) -> State:
    """Fresh weights from the same initialisation scheme and a new seed; BatchNorm
    running statistics start afresh too, so the result depends on nothing but the
    seed (not on what the model held before)."""
    gen = torch.Generator().manual_seed(seed)
    saved = snapshot(model)
    initialize(model, init, gen)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            m.reset_running_stats()
    fresh = snapshot(model)
    model.load_state_dict(saved)
    return fresh


def reshuffle(state: State, mask: Mask, seed: int) -> State:
    """Permute the surviving values within each layer (pruned places stay put)."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name, m in mask.items():
        w = state[name].clone()
        flat = w.view(-1)
        keep = m.view(-1).to(flat.device)
        kept = flat[keep]
        # drawn with the CPU generator: the same permutation on every device
        perm = torch.randperm(kept.numel(), generator=gen).to(flat.device)
        flat[keep] = kept[perm]
        out[name] = w
    return out


def signed_constant(state: State, mask: Mask, init: str) -> State:
    """sign(w) times the std of the layer's initial distribution."""
    out = dict(state)
    for name in mask.names():
        w = state[name]
        out[name] = torch.sign(w) * layer_init_std(w, init)
    return out


def random_mask(mask: Mask, seed: int) -> Mask:
    """A random mask with each layer's kept count of ``mask``."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, m in mask.items():
        flat = torch.zeros(m.numel(), dtype=torch.bool)
        flat[torch.randperm(m.numel(), generator=gen)[: int(m.sum())]] = True
        out[name] = flat.view_as(m).to(m.device)  # drawn on the CPU, placed beside `mask`
    return Mask(out)
