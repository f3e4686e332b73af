"""Early-bird tickets (You et al. 2020): the building blocks.

Training adds an L1 penalty on the BatchNorm scales (network slimming): its
subgradient ``s * sign(gamma)`` is added to each BN weight's gradient before
the optimizer step (:class:`BNL1Penalty`). After each epoch a channel mask at
pruning ratio p is drawn from one global threshold over all BN |gamma|
(:func:`channel_mask`); the last 5 masks are kept, and a ticket is drawn when
the queue is full and the normalised Hamming distance of the newest mask to
each of the 4 others is <= 0.1 (:class:`EarlyBirdDetector`). A channel mask
expands to weight masks of the convolutions that feed the BN layers
(:func:`expand_channel_mask`). :class:`EarlyBirdWatch` runs the detector in
the training loop.
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn

from ..errors import UsageError
from ..masks import Mask

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


@torch.no_grad()
def channel_mask(model: nn.Module, ratio: float) -> dict[str, torch.Tensor]:
    """Keep-masks over the channels of every BN layer: the ``ratio`` of all channels with
    the smallest |gamma| (one global threshold) are pruned."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"pruning ratio must be in (0, 1); got {ratio}")
    bns = bn_layers(model)
    if not bns:
        raise UsageError("early-bird tickets need a model with BatchNorm layers")
    gammas = torch.cat([bn.weight.detach().abs().flatten().cpu() for bn in bns.values()])
    k = int(gammas.numel() * ratio)
    threshold = torch.sort(gammas).values[k] if k < gammas.numel() else float("inf")
    return {n: bn.weight.detach().abs().cpu() >= threshold for n, bn in bns.items()}


def mask_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Normalised Hamming distance: the fraction of channels (or weights) that differ."""
    fa = torch.cat([a[n].flatten() for n in sorted(a)])
    fb = torch.cat([b[n].flatten() for n in sorted(b)])
    return int((fa != fb).sum()) / fa.numel() if fa.numel() else 0.0


class EarlyBirdDetector:
    """FIFO of the last ``keep`` masks; draws when it is full and the newest is within
    ``threshold`` of every other one."""

    def __init__(self, keep: int = 5, threshold: float = 0.1):
        if keep < 2:
            raise UsageError(f"the mask queue must hold >= 2 masks; got {keep}")
        self.keep, self.threshold = keep, threshold
        self.queue: deque = deque(maxlen=keep)
        self.distances: list[float] = []

    def push(self, mask: dict[str, torch.Tensor]) -> bool:
        """Add the newest mask; True when a ticket is drawn."""
        self.queue.append({n: m.clone() for n, m in mask.items()})
        if len(self.queue) < self.keep:
            self.distances = []
            return False
        newest = self.queue[-1]
        self.distances = [mask_distance(newest, m) for m in list(self.queue)[:-1]]
        return max(self.distances) <= self.threshold


def expand_channel_mask(model: nn.Module, channels: dict[str, torch.Tensor]) -> Mask:
    """Weight masks of the prunable layers: a conv (or linear) whose outputs feed a BN
    loses the rows of that BN's pruned channels; other layers stay dense.

    The layer feeding a BN is the last Conv/Linear before it in module order.
    """
    prunable = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    masks, last = {}, None
    for name, module in model.named_modules():
        if isinstance(module, prunable):
            last = name
            masks[f"{name}.weight"] = torch.ones_like(module.weight, dtype=torch.bool)
        elif name in channels and last is not None:
            w = masks[f"{last}.weight"]
            keep = channels[name].to(w.device)
            if w.shape[0] == keep.numel():
                masks[f"{last}.weight"] = w & keep.view(-1, *([1] * (w.dim() - 1)))
    return Mask(masks)


@torch.no_grad()
def apply_channel_mask(model: nn.Module, channels: dict[str, torch.Tensor]) -> None:
    """Zero the BN scale and shift of pruned channels (their weights go with the Mask)."""
    bns = bn_layers(model)
    for n, keep in channels.items():
        bn = bns[n]
        bn.weight.mul_(keep.to(bn.weight))
        if bn.bias is not None:
            bn.bias.mul_(keep.to(bn.bias))


class EarlyBirdWatch:
    """Training-loop callback: a channel mask after every epoch, the detector on it.

    ``unstructured=True`` uses global weight-magnitude masks of the prunable
    layers instead (same ratio, same queue). ``drawn`` is the epoch of the draw
    (None until then) and ``state`` a copy of the model's state at that point.
    """

    def __init__(
        self,
        steps_per_epoch: int,
        ratio: float,
        keep: int = 5,
        threshold: float = 0.1,
        unstructured: bool = False,
    ):
        self.spe, self.ratio, self.unstructured = steps_per_epoch, ratio, unstructured
        self.detector = EarlyBirdDetector(keep, threshold)
        self.drawn: int | None = None
        self.mask = None
        self.state = None
        self.history: list[dict] = []

    def current_mask(self, model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.unstructured:
            return channel_mask(model, self.ratio)
        from ..pruning.allocation import select

        dense = Mask.dense(model)
        scores = {n: p.detach().abs() for n, p in model.named_parameters() if n in dense}
        return dict(select(scores, dense, 1.0 - self.ratio, "global", model=model).items())

    def after_step(self, step: int, model, optimizer, keeper, x, y) -> None:
        if self.drawn is not None or (step + 1) % self.spe:
            return
        epoch = (step + 1) // self.spe
        mask = self.current_mask(model)
        hit = self.detector.push(mask)
        self.history.append({"epoch": epoch, "distances": list(self.detector.distances)})
        if hit:
            self.drawn, self.mask = epoch, mask
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}


__all__ = [
    "BNL1Penalty",
    "EarlyBirdDetector",
    "EarlyBirdWatch",
    "apply_channel_mask",
    "channel_mask",
    "expand_channel_mask",
    "mask_distance",
]
