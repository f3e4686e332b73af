"""Batch order as a pure function of (seed, step), so a resumed run sees the same batches."""

from __future__ import annotations

import torch

from ticketlab.errors import DataError

_MASK63 = (1 << 63) - 1


def epoch_seed(seed: int, epoch: int) -> int:
    """Generator seed for one epoch: a fixed integer mix, so no state carries between epochs."""
    return (seed * 1_000_003 + epoch) & _MASK63


def _steps_per_epoch(n: int, batch_size: int) -> int:
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if n < batch_size:
        raise DataError(f"batch size {batch_size} is larger than the {n} training examples")
    return n // batch_size


def _epoch_perm(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(epoch_seed(seed, epoch)))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """Indices (int64) of the batch at `step`: epochs are seeded permutations of range(n), and
    the last partial batch of each epoch is dropped."""
    if step < 0:
        raise DataError(f"step must be >= 0, got {step}")
    spe = _steps_per_epoch(n, batch_size)
    i = step % spe
    return _epoch_perm(n, seed, step // spe)[i * batch_size : (i + 1) * batch_size]


class BatchSampler:
    """`batch_indices` with the current epoch's permutation cached, for sequential steps.

    With ``device``, the permutation (drawn on the CPU, so the order is the same on every
    device) is moved there once per epoch: a training loop on a GPU then takes its batches
    without a host-to-device copy per step."""

    def __init__(self, n: int, batch_size: int, seed: int, device=None):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.device = device
        self.steps_per_epoch = _steps_per_epoch(n, batch_size)
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def indices(self, step: int) -> torch.Tensor:
        if step < 0:
            raise DataError(f"step must be >= 0, got {step}")
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = _epoch_perm(self.n, self.seed, epoch)
            self._perm = perm if self.device is None else perm.to(self.device)
            self._epoch = epoch
        # A copy, so a caller writing into the batch cannot alter the cached permutation.
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size].clone()
