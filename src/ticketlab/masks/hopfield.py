"""Binary masks stored as attractors of a fixed-size Hopfield network (HopSupSup:
Wortsman et al. 2020, "Supermasks in Superposition", the Hopfield section).

A mask over a layer's d weights is the pattern x = 2m - 1 in {-1, 1}^d. Each masked
layer has one Hopfield network, a symmetric d x d matrix W, and each new mask is
learned into it with the Storkey rule in the form of the reference code
(``FastHopMaskBN.cache_masks``), with local field h = W x:

    W <- W + (x x^T - I - x h^T - h x^T) / d

Besides W the memory keeps the running sum of the stored patterns (d numbers), the
starting point of recall. Neither grows with the number of masks stored: the memory
holds d^2 + d numbers per layer, however many tasks it holds. The energy is
E(s) = -1/2 s^T W s, summed over layers; below capacity the stored patterns are
local minima (attractors), past it they stop being so.

Two ways to read a mask back:

- :func:`settle`: the classic dynamics, asynchronous sign updates s_i <- sign(W_i s)
  in a fixed order until nothing changes (each flip lowers E); for hand-sized cases.
- :func:`recall`: SupSup's recovery, which knows no task id. The scores start at the
  mean of the stored patterns and follow SGD on

      (1 - k/N) * objective(mask) + gamma * (k/N) * E(2 * [scores >= 0] - 1)

  over N test batches (k = 1..N), the task-inference objective (output entropy) fading
  out as the Hopfield energy fades in; the mask is [scores >= 0], with the gradient
  passed straight through the threshold. The reference's defaults: SGD lr 500,
  momentum 0.9, weight decay 1e-4, gamma 1.5e-3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from . import Mask

# the largest layer a Hopfield memory takes: W is d x d float32 (4096^2: 64 MiB)
MAX_PATTERN_SIZE = 4096


class _Threshold(torch.autograd.Function):
    """[s >= 0] forward, the gradient straight through (the reference's GetSubnetFast)."""

    @staticmethod
    def forward(ctx, scores: Tensor) -> Tensor:
        return (scores >= 0).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad


def signs_of(mask: Mask) -> dict[str, Tensor]:
    """A mask as patterns in {-1, 1}^d, one flat vector per layer."""
    return {n: mask[n].flatten().to(torch.float32) * 2 - 1 for n in mask.names()}


class HopfieldMemory:
    """One Hopfield network per masked layer (``shapes``: name -> weight shape)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        self.size = {n: int(torch.Size(s).numel()) for n, s in self.shapes.items()}
        big = {n: d for n, d in self.size.items() if d > MAX_PATTERN_SIZE}
        if big:
            name, d = next(iter(big.items()))
            raise ValueError(
                f"layer {name} has {d} mask entries: its Hopfield network would be {d} x {d} "
                f"(at most {MAX_PATTERN_SIZE} entries per layer)"
            )
        self.W = {n: torch.zeros(d, d) for n, d in self.size.items()}
        self.total = {n: torch.zeros(d) for n, d in self.size.items()}
        self.count = 0

    def numel(self) -> int:
        """Numbers the memory holds: fixed by the layer sizes, not by the masks stored."""
        return sum(d * d + d for d in self.size.values())

    @torch.no_grad()
    def store(self, mask: Mask) -> None:
        """Learn one mask (Storkey rule, see the module docstring)."""
        for n, x in signs_of(mask).items():
            d, W = self.size[n], self.W[n]
            h = W @ x
            pre = torch.outer(x, h)
            self.W[n] = W + (torch.outer(x, x) - torch.eye(d) - pre - pre.T) / d
            self.total[n] += x
        self.count += 1

    def energy(self, signs: dict[str, Tensor]) -> Tensor:
        """E(s) = -1/2 sum over layers of s^T W s."""
        return sum(-0.5 * (s @ (self.W[n] @ s)) for n, s in signs.items())

    @torch.no_grad()
    def unstable(self, mask: Mask) -> int:
        """Entries of ``mask`` whose field disagrees with them (one update would flip
        them): 0 when the mask is a fixed point of the dynamics, an attractor."""
        return sum(int(((self.W[n] @ x) * x < 0).sum()) for n, x in signs_of(mask).items())

    def superposition(self) -> dict[str, Tensor]:
        """The mean of the stored patterns, per layer (zeros before any is stored)."""
        return {n: t / max(self.count, 1) for n, t in self.total.items()}

    def to_mask(self, signs: dict[str, Tensor]) -> Mask:
        return Mask({n: (s >= 0).reshape(self.shapes[n]) for n, s in signs.items()})

    def state_dict(self) -> dict[str, Tensor]:
        out = {f"W/{n}": w for n, w in self.W.items()}
        out.update({f"total/{n}": t for n, t in self.total.items()})
        out["count"] = torch.tensor(self.count)
        return out


@torch.no_grad()
def settle(memory: HopfieldMemory, start: dict[str, Tensor], sweeps: int = 100):
    """Asynchronous Hopfield dynamics from ``start`` (patterns in {-1, 1}^d): each unit in
    turn takes the sign of its field (a zero field keeps it) until a sweep changes nothing.
    Returns the fixed point reached (or the state after ``sweeps``)."""
    out = {}
    for n, s0 in start.items():
        s, W = s0.clone(), memory.W[n]
        for _ in range(sweeps):
            changed = False
            for i in range(len(s)):
                field = float(W[i] @ s)
                new = 1.0 if field > 0 else -1.0 if field < 0 else float(s[i])
                if new != float(s[i]):
                    s[i], changed = new, True
            if not changed:
                break
        out[n] = s
    return out


def recall(
    memory: HopfieldMemory,
    objective: Callable[[int, dict[str, Tensor]], Tensor] | None,
    batches: int,
    gamma: float = 1.5e-3,
    lr: float = 500.0,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    start: dict[str, Tensor] | None = None,
) -> Mask:
    """SupSup's Hopfield recovery (see the module docstring), over ``batches`` steps.

    ``objective(k, masks)`` is the task-inference loss on test batch ``k`` with the
    layers masked by ``masks`` (float 0/1 tensors of the weights' shapes, carrying the
    straight-through gradient); None descends the energy alone. ``start`` replaces the
    superposition of the stored patterns as the initial scores."""
    init = memory.superposition() if start is None else start
    scores = {n: init[n].detach().clone().requires_grad_(True) for n in memory.size}
    opt = torch.optim.SGD(scores.values(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for k in range(batches):
        frac = (k + 1) / batches
        masks = {n: _Threshold.apply(s) for n, s in scores.items()}
        loss = gamma * frac * memory.energy({n: 2 * m - 1 for n, m in masks.items()})
        if objective is not None and frac < 1:
            shaped = {n: m.reshape(memory.shapes[n]) for n, m in masks.items()}
            loss = loss + (1 - frac) * objective(k, shaped)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return memory.to_mask({n: s.detach() for n, s in scores.items()})


def hamming(a: Mask, b: Mask) -> int:
    """Entries where two masks differ."""
    return sum(int((a[n] != b[n]).sum()) for n in a.names())


__all__ = ["HopfieldMemory", "MAX_PATTERN_SIZE", "hamming", "recall", "settle", "signs_of"]
