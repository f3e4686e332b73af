"""Symmetric label noise on the training split (He et al. 2022, "Sparse Double Descent").

A seeded fraction ``p`` of the training labels is changed, each to a class drawn
uniformly from the *other* classes, so exactly ``round(p * n)`` labels are wrong.
The validation and test labels stay clean: the curve that shows the double descent
is the accuracy on clean test labels.
"""

from __future__ import annotations

import dataclasses

import torch

from ticketlab.errors import UsageError

from .dataset import Dataset


def check_label_noise(p) -> None:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise UsageError(f"label noise must be a fraction in [0, 1); got {p}")


def noisy_labels(y: torch.Tensor, num_classes: int, p: float, seed: int) -> torch.Tensor:
    """``y`` with ``round(p * len(y))`` labels, chosen by ``seed``, each changed to a
    different class (uniform over the other ``num_classes - 1``)."""
    check_label_noise(p)
    n = len(y)
    k = int(round(p * n))
    if k == 0:
        return y.clone()
    if num_classes < 2:
        raise UsageError("label noise needs at least two classes")
    gen = torch.Generator().manual_seed(seed)
    which = torch.randperm(n, generator=gen)[:k]
    # an offset in 1..C-1 never maps a class to itself
    offset = torch.randint(1, num_classes, (k,), generator=gen)
    out = y.clone()
    out[which] = (y[which] + offset) % num_classes
    return out


def with_label_noise(data: Dataset, p: float, seed: int) -> Dataset:
    """A copy of ``data`` whose training labels carry label noise ``p`` (the inputs are
    shared, not copied); ``data`` itself is unchanged. ``p == 0`` returns ``data``."""
    check_label_noise(p)
    if p == 0:
        return data
    if not dataclasses.is_dataclass(data) or not torch.is_tensor(data.y_train):
        raise UsageError(
            "label noise needs class labels in memory; this dataset is streamed or its "
            "targets are not a tensor"
        )
    y = noisy_labels(data.y_train, data.num_classes, float(p), seed)
    return dataclasses.replace(data, y_train=y)
