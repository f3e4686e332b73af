"""Task sequences drawn from one dataset, for continual learning: each task permutes
the inputs (``permuted``) or keeps one pair of classes (``split``)."""

from __future__ import annotations

import math

import torch

from .dataset import Dataset

TASK_KINDS = ("permuted", "split")
# the purpose string each task's seed is derived from (with the run's seed and the task
# index): every continual-learning method uses it, so they all see the same sequence
TASK_SEED_PURPOSE = "supsup/task"


def _subset(x: torch.Tensor, y: torch.Tensor, pair: tuple[int, int]):
    keep = (y == pair[0]) | (y == pair[1])
    return x[keep], (y[keep] == pair[1]).long()


def make_task(data: Dataset, kind: str, t: int, seed: int) -> Dataset:
    """Task ``t`` of the sequence: a permutation of the inputs or a class pair."""
    if kind == "permuted":
        n = math.prod(data.input_shape)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

        def tf(x):
            return x.flatten(1)[:, perm].reshape(x.shape)

        splits = {s: (tf(getattr(data, f"x_{s}")), getattr(data, f"y_{s}")) for s in
                  ("train", "val", "test")}  # fmt: skip
        classes = data.num_classes
    else:
        pair = (2 * t, 2 * t + 1)
        splits = {
            s: _subset(getattr(data, f"x_{s}"), getattr(data, f"y_{s}"), pair)
            for s in ("train", "val", "test")
        }
        classes = 2
    return Dataset(
        name=f"{data.name}/{kind}-{t}",
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=classes,
    )


def task_sequence(data: Dataset, kind: str, seeds: list[int]) -> list[Dataset]:
    """Tasks ``0..len(seeds)-1`` of one sequence, task ``t`` drawn with ``seeds[t]``
    (methods derive them from the run's seed, ``t`` and :data:`TASK_SEED_PURPOSE`)."""
    return [make_task(data, kind, t, seed) for t, seed in enumerate(seeds)]
