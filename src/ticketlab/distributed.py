"""Where work runs across processes of one training: ``torchrun`` ranks.

``torchrun --nproc-per-node N -m ticketlab lottery ...`` starts N copies of the
command. Every rank runs the whole experiment (the same seeds, the same decisions),
each training step's global batch is split over the ranks and DDP averages the
gradients, so every rank holds the same weights at every step. Rank 0 alone writes
the run store; the other ranks write a private mirror of it (copied from rank 0's
directory when they start, so a restart resumes from what rank 0 stored).

A module of its own (beside :mod:`ticketlab.executors`, which runs whole experiments
in worker processes) because the training loop needs it and executors needs the loop.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import UsageError


def world() -> tuple[int, int]:
    """(rank, world size) of this process: from torchrun's environment, else (0, 1)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_writer() -> bool:
    """Whether this process writes the run store (always, except ranks > 0)."""
    return world()[0] == 0


_DATA_PARALLEL = None


def data_parallel():
    """This rank's :class:`DataParallel` under torchrun (world size > 1), else None."""
    global _DATA_PARALLEL
    if world()[1] <= 1:
        return None
    if _DATA_PARALLEL is None:
        _DATA_PARALLEL = DataParallel()
    return _DATA_PARALLEL


def end_data_parallel() -> None:
    """Leave the process group, if this process joined one."""
    global _DATA_PARALLEL
    if _DATA_PARALLEL is not None:
        _DATA_PARALLEL.dist.destroy_process_group()
        _DATA_PARALLEL = None


def mirror_dir(run_dir: Path) -> Path:
    """Where a rank > 0 keeps its mirror of ``run_dir`` (outside the run store)."""
    rank, _ = world()
    job = os.environ.get("TORCHELASTIC_RUN_ID", "local")
    base = Path(os.environ.get("TMPDIR", "/tmp")) / f"ticketlab-rank{rank}-{job}-{os.getuid()}"
    return base / run_dir.name


class DataParallel:
    """One rank's part in data-parallel training over ``torch.distributed``: ``gloo``
    for tensors on the CPU, ``nccl`` for CUDA tensors."""

    def __init__(self):
        import torch.distributed as dist

        self.dist = dist
        if not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise UsageError(
                f"the global batch of {batch_size} does not split over {self.world} ranks: "
                f"give a --batch-size that {self.world} divides"
            )

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's equal part of a global batch's indices (contiguous)."""
        n = len(idx) // self.world
        return idx[self.rank * n : (self.rank + 1) * n]

    def wrap(self, model):
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)

    def agree(self, mask) -> None:
        """Make ``mask`` rank 0's (broadcast in place) and check every rank holds it."""
        if mask is None:
            return
        for _, m in sorted(mask.items()):
            as_bytes = m.to(torch.uint8)
            self.dist.broadcast(as_bytes, src=0)
            m.copy_(as_bytes.bool())
        digest = torch.tensor([_mask_digest(mask)], dtype=torch.int64)
        got = [torch.zeros_like(digest) for _ in range(self.world)]
        self.dist.all_gather(got, digest)
        if len({int(g) for g in got}) != 1:
            raise RuntimeError("the ranks hold different masks after the broadcast")

    def any(self, *flags: bool) -> list[bool]:
        """Per flag, whether it is set on any rank (one all-reduce for all of them)."""
        t = torch.tensor([int(f) for f in flags], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MAX)
        return [bool(v) for v in t]

    def min(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return int(t)

    def barrier(self) -> None:
        self.dist.barrier()


def _mask_digest(mask) -> int:
    import hashlib

    h = hashlib.sha256()
    for name, m in sorted(mask.items()):
        h.update(name.encode())
        h.update(m.to("cpu", torch.uint8).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest()[:7], "little")
