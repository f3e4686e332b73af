"""Sparsity metrics of a pruned network, added to every results row.

- ``compression_ratio`` (ShrinkBench, Blalock et al. 2020): all parameters
  (biases and norms included) over the nonzero ones.
- ``flops_speedup``: theoretical speedup, dense multiply-adds of one example
  in the Linear and Conv layers over the remaining ones, each layer's count
  scaled by its mask density (the counter of :mod:`ticketlab.methods.dst`).
- ``effective_density`` (Vysogorets & Kempe 2023): the fraction of prunable
  weights on some input-to-output path through kept weights. A weight is
  effective if its input unit (channel, for conv) is reachable from the input
  and its output unit (channel) reaches the output. Conv layers are reduced to
  channel-to-channel graphs: a kernel is alive if any of its entries is kept.
  Biases are ignored (a unit fed only by its bias carries no path).
- ``inference_speedup`` (rows of networks made physically smaller): measured
  inference latency of the original network over the smaller one's, on one
  test batch in this process (:func:`inference_speedup`).

The path computation follows the prunable layers in module order, which is
the data flow of MLPs and sequential conv nets (pooling, activations and norms
keep channels; a flatten from C channels into C*k features is recognised).
Networks whose layers do not chain that way -- residual nets (skip
connections), grouped convs, custom graphs -- get NaN: no approximation is
attempted for them.
"""

from __future__ import annotations

import math
import statistics
import sys
import time

import torch
from torch import nn

from .data import structure
from .masks import PRUNABLE_TYPES, Mask

# multiply-adds and FLOPs ----------------------------------------------------------------------


@torch.no_grad()
def layer_macs(model: nn.Module, input_shape) -> dict[str, int]:
    """Dense multiply-adds of one example in each prunable layer, from one hooked forward.

    ``input_shape`` is one example's shape (a zero input is fed), or the input itself: a
    batch of one, a tensor, tuple or dict (integer token ids cannot be made up from a
    shape). Linear and Conv layers are counted; MultiheadAttention's in-projections are not.
    """
    out_sizes: dict[str, torch.Size] = {}
    handles = []
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            name = f"{mod_name}.weight" if mod_name else "weight"

            def hook(mod, inp, out, name=name):
                out_sizes[name] = out.shape

            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        if isinstance(input_shape, (tuple, list)) and all(isinstance(d, int) for d in input_shape):
            model(torch.zeros((1, *input_shape), device=device))
        else:
            structure.call(model, structure.to_device(input_shape, device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    params = dict(model.named_parameters())
    macs = {}
    for name, shape in out_sizes.items():
        w = params[name]
        # each output element costs (fan-in) multiply-adds: w.numel() / out_channels
        spatial = math.prod(shape[2:]) if len(shape) > 2 else 1
        macs[name] = int(w.numel()) * spatial
    return macs


def forward_flops(macs: dict[str, int], densities: dict[str, float] | None = None) -> float:
    """f_S (with per-layer densities) or f_D (without): multiply-adds of one forward pass."""
    return float(
        sum(m * (1.0 if densities is None else densities.get(n, 1.0)) for n, m in macs.items())
    )


def train_flops_per_step(algorithm: str, f_s: float, f_d: float, delta_t: int = 100) -> float:
    """Per-example training cost of one step as the RigL paper counts it."""
    if algorithm == "rigl":
        return (3 * f_s * delta_t + 2 * f_s + f_d) / (delta_t + 1)
    return 3 * f_s


def parameter_count(model: nn.Module) -> int:
    """All parameters of ``model``, zero or not."""
    return sum(p.numel() for p in model.parameters())


def compression(original: nn.Module, smaller: nn.Module) -> float:
    """Parameter count ratio original / smaller."""
    return parameter_count(original) / max(parameter_count(smaller), 1)


def multiply_adds(model: nn.Module, input_shape: tuple) -> int:
    """Multiply-adds of one example's forward pass in the Linear and Conv layers."""
    return int(sum(layer_macs(model, tuple(input_shape)).values()))


def compression_ratio(model: nn.Module) -> float:
    """All parameters over nonzero parameters (inf when every parameter is zero)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return total / nonzero if nonzero else math.inf


def flops_speedup(model: nn.Module, mask: Mask, input_shape: tuple) -> float:
    """Dense over remaining multiply-adds of one forward pass (Linear and Conv layers)."""
    macs = layer_macs(model, input_shape)
    densities = {n: d for n, d in mask.layer_density().items() if n in macs}
    dense, sparse = forward_flops(macs), forward_flops(macs, densities)
    return dense / sparse if sparse else math.inf


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """Prunable layers in module order, or None when they do not form a plain chain."""
    for module in model.modules():
        if hasattr(module, "shortcut") or "resnet" in type(module).__name__.lower():
            return None
        if isinstance(module, (nn.MultiheadAttention, nn.Embedding)):
            return None  # attention mixes positions: no chain of units
    out = []
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and module.weight is not None:
            if getattr(module, "groups", 1) != 1:
                return None
            out.append((f"{mod_name}.weight" if mod_name else "weight", module))
    return out or None


def _units(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """[out, in] bool: unit (channel) i feeds unit o through some kept weight."""
    return m.reshape(w.shape[0], w.shape[1], -1).any(-1)


def _link(prev_out: int, n_in: int) -> int | None:
    """Features of the next layer per unit of the previous one (1, or k for a flatten)."""
    if n_in == prev_out:
        return 1
    if prev_out and n_in % prev_out == 0:
        return n_in // prev_out
    return None


def effective_mask(model: nn.Module, mask: Mask) -> Mask | None:
    """The kept weights that lie on an input-to-output path; None for a non-chain network."""
    layers = _layers(model)
    if layers is None or any(n not in dict(layers) for n in mask.names()):
        return None  # not a chain, or parameters beyond Linear and Conv weights are masked
    conn = []
    for name, module in layers:
        w = module.weight
        m = mask[name].to(w.device) if name in mask else torch.ones_like(w, dtype=torch.bool)
        conn.append((name, m.bool(), _units(w, m.bool()).cpu()))
    links = [1]
    for (_, _, a), (_, _, b) in zip(conn[:-1], conn[1:]):
        k = _link(a.shape[0], b.shape[1])
        if k is None:
            return None
        links.append(k)
    # forward: which input units of each layer are reachable from the input
    reach_in = []
    alive = torch.ones(conn[0][2].shape[1], dtype=torch.bool)
    for i, (_, _, a) in enumerate(conn):
        if i > 0:
            alive = alive.repeat_interleave(links[i])
        reach_in.append(alive)
        alive = (a & alive[None, :]).any(1)
    # backward: which output units of each layer reach the output
    reach_out = [torch.ones(0, dtype=torch.bool)] * len(conn)
    alive = torch.ones(conn[-1][2].shape[0], dtype=torch.bool)
    for i in range(len(conn) - 1, -1, -1):
        a = conn[i][2]
        reach_out[i] = alive
        alive = (a & alive[:, None]).any(0)
        if i > 0:
            alive = alive.view(-1, links[i]).any(1)
    out = {}
    for (name, m, _), rin, rout in zip(conn, reach_in, reach_out):
        shape = (m.shape[0], m.shape[1]) + (1,) * (m.dim() - 2)
        both = (rout[:, None] & rin[None, :]).view(shape).to(m.device)
        out[name] = m & both
    return Mask(out)


def effective_density(model: nn.Module, mask: Mask, warn: bool = True) -> float:
    """Effective weights over all prunable weights of ``mask``; NaN for non-chain networks.

    With ``warn``, a line on stderr names each layer with kept weights but no
    effective ones (layer collapse).
    """
    eff = effective_mask(model, mask)
    if eff is None:
        return math.nan
    if warn:
        for name, m in eff.items():
            if not bool(m.any()):
                print(f"layer collapse: layer {name} has no effective weights", file=sys.stderr)
    names = [n for n in mask.names() if n in eff]
    total = sum(mask[n].numel() for n in names)
    return sum(int(eff[n].sum()) for n in names) / total if total else math.nan


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def inference_speedup(reference: nn.Module, model: nn.Module, x: torch.Tensor, rounds: int = 5):
    """Latency of ``reference`` over that of ``model`` on the batch ``x``, both in eval mode.

    After one warm-up pass each, the two alternate for ``rounds`` rounds of one pass
    (order rotating; the device synchronised around each), and the median of the
    per-round ratios is returned: pairs timed back to back cancel slow drifts of a
    shared machine. It is one process's wall clock, so it varies from run to run;
    ``benchmarks/structured_speed.py`` takes the careful figure. Modes are restored.
    """
    device = x.device
    modes = [reference.training, model.training]
    reference.eval()
    model.eval()

    def timed(net: nn.Module) -> float:
        _sync(device)
        t0 = time.perf_counter()
        net(x)
        _sync(device)
        return time.perf_counter() - t0

    timed(reference), timed(model)
    ratios = []
    for r in range(max(1, rounds)):
        if r % 2 == 0:
            a, b = timed(reference), timed(model)
        else:
            b, a = timed(model), timed(reference)
        ratios.append(a / b if b > 0 else math.inf)
    reference.train(modes[0])
    model.train(modes[1])
    return statistics.median(ratios)


def sparsity_metrics(model: nn.Module, mask: Mask, input_shape: tuple) -> dict[str, float]:
    """The three metrics of a results row."""
    return {
        "compression_ratio": compression_ratio(model),
        "flops_speedup": flops_speedup(model, mask, input_shape),
        "effective_density": effective_density(model, mask),
    }


__all__ = [
    "compression_ratio",
    "effective_density",
    "effective_mask",
    "flops_speedup",
    "inference_speedup",
    "sparsity_metrics",
]
