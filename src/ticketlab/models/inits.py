"""Weight initialisations, drawn from an explicit generator so that builds are reproducible."""

from __future__ import annotations

import math

import torch
from torch import nn

from ticketlab.errors import UsageError

INITS = ("kaiming_normal", "kaiming_uniform", "xavier_normal", "xavier_uniform")
_ALIASES = {"glorot_normal": "xavier_normal", "glorot_uniform": "xavier_uniform"}
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def canonical_init(init: str) -> str:
    name = _ALIASES.get(init, init)
    if name not in INITS:
        raise UsageError(f"unknown init '{init}'; choose from: {', '.join(INITS)}, glorot_normal")
    return name


def layer_init_std(weight: torch.Tensor, init: str) -> float:
    """Standard deviation of `init`'s distribution for a weight of this shape.

    A uniform init has the same std as its normal twin (the bound is sqrt(3) std).
    """
    name = canonical_init(init)
    fan_in, fan_out = nn.init._calculate_fan_in_and_fan_out(weight)
    if name.startswith("kaiming"):
        return math.sqrt(2.0 / fan_in)  # He et al. 2015, fan_in mode, ReLU gain
    return math.sqrt(2.0 / (fan_in + fan_out))  # Glorot & Bengio 2010


@torch.no_grad()
def initialize(model: nn.Module, init: str, generator: torch.Generator | None = None) -> nn.Module:
    """Re-draw every Linear/Conv weight from `init`, zero their biases, reset norm layers;
    MultiheadAttention's in-projections are drawn from `init` too (each of Q, K and V as
    one matrix, its biases zeroed) and Embedding tables from N(0, 1), PyTorch's own.

    Works on any module; parameters of other layer types are left as they are.
    """
    name = canonical_init(init)

    def draw(w, std, normal):
        # Draw on the generator's device so a CPU generator can seed a GPU model.
        device = generator.device if generator is not None else w.device
        out = torch.empty(w.shape, dtype=w.dtype, device=device)
        if normal:
            out.normal_(0.0, std, generator=generator)
        else:
            bound = math.sqrt(3.0) * std
            out.uniform_(-bound, bound, generator=generator)
        w.copy_(out)

    for module in model.modules():
        if isinstance(module, _WEIGHTED):
            w = module.weight
            draw(w, layer_init_std(w, name), name.endswith("normal"))
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.MultiheadAttention):
            if module.in_proj_weight is not None:
                for part in module.in_proj_weight.chunk(3):  # views: Q, K, V
                    draw(part, layer_init_std(part, name), name.endswith("normal"))
            for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                if w is not None:
                    draw(w, layer_init_std(w, name), name.endswith("normal"))
            if module.in_proj_bias is not None:
                module.in_proj_bias.zero_()
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
            draw(module.weight, 1.0, True)
            if module.padding_idx is not None:
                module.weight[module.padding_idx].zero_()
        elif isinstance(module, _NORMS):
            if getattr(module, "weight", None) is not None:
                module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
            if getattr(module, "track_running_stats", False):
                module.reset_running_stats()
    return model
