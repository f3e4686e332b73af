"""Datasets generated on the spot: MNIST-1D (from its templates) and 2-D XOR."""

from __future__ import annotations

import functools
import random

import numpy as np
import torch

XOR_SIZES = (4000, 1000)
# Different seeds for train and test, so the test points are fresh draws.
XOR_SEEDS = (20_240_601, 20_240_602)


@functools.cache
def _mnist1d_arrays() -> tuple[np.ndarray, ...]:
    # make_dataset builds the examples from the package's templates; get_dataset would download.
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset reseeds the global numpy and random generators; leave them as they were.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    arrays = (d["x"], d["y"], d["x_test"], d["y_test"])
    for a in arrays:
        a.setflags(write=False)  # shared by every caller through the cache
    return arrays


def mnist1d() -> tuple[torch.Tensor, ...]:
    """MNIST-1D with the package's default arguments: 4000 train and 1000 test sequences of
    length 40, as (x_train (N,1,40) float32, y_train, x_test, y_test)."""
    x, y, xt, yt = _mnist1d_arrays()
    return (
        torch.tensor(x, dtype=torch.float32)[:, None],
        torch.tensor(y, dtype=torch.int64),
        torch.tensor(xt, dtype=torch.float32)[:, None],
        torch.tensor(yt, dtype=torch.int64),
    )


def xor_points(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points uniform in [-1, 1]^2 labelled (x0 > 0) xor (x1 > 0)."""
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return x, ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()


def xor() -> tuple[torch.Tensor, ...]:
    return (*xor_points(XOR_SIZES[0], XOR_SEEDS[0]), *xor_points(XOR_SIZES[1], XOR_SEEDS[1]))
