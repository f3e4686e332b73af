"""The step loop reads nothing back from the device between evaluations.

On a GPU every ``.item()``, ``bool(t)``, ``float(t)``, ``.tolist()``, ``.cpu()`` or
``nonzero`` waits for the device's queue to drain, so one per step makes a small network
launch-bound. On the CPU the same calls are counted: a phase of many steps must make no
more of them than a phase of few (the evaluations and the result are the same in both),
whether the phase runs masked dense, on CSR kernels, or as a stack of copies.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import ticketlab as tl
from ticketlab.data import from_tensors
from ticketlab.vectorized import Copy, train_stacked

READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "nonzero")


@contextlib.contextmanager
def counting_reads():
    """Count the calls of every Tensor method that reads a value back to the host."""
    counts = {name: 0 for name in READS}
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    original_nonzero = torch.nonzero

    def wrap(name, fn):
        def counted(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)

        return counted

    for name, fn in originals.items():
        setattr(torch.Tensor, name, wrap(name, fn))
    torch.nonzero = wrap("nonzero", original_nonzero)
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)
        torch.nonzero = original_nonzero


def xor_data(n=1200, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g) * 2 - 1
    x = torch.cat([x, torch.randn(n, 62, generator=g) * 0.1], 1)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    return from_tensors(x[:1000], y[:1000], x[1000:], y[1000:], val_size=100, name="xor")


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 2))


def sparse_mask(model, density=0.05, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tl.Mask(
        {
            n: torch.rand(p.shape, generator=g) < (density if n == "0.weight" else 1.0)
            for n, p in model.named_parameters()
            if n.endswith("weight")
        }
    )


def reads_of_a_phase(steps: int, kernels: str) -> dict:
    data = xor_data()
    model = mlp()
    spec = tl.Spec(
        steps=f"{steps}it", batch_size=20, optimizer="adam", lr=1e-3, weight_decay=1e-4,
        eval_every=f"{steps}it", kernels=kernels,
    )  # fmt: skip
    mask = sparse_mask(model)
    with counting_reads() as counts:
        tl.train(model, data, spec, mask)
    return dict(counts)


@pytest.mark.parametrize("kernels", ["dense", "sparse"])
def test_many_steps_read_back_no_more_than_few(kernels):
    few, many = reads_of_a_phase(20, kernels), reads_of_a_phase(600, kernels)
    assert sum(few.values()) > 0  # the evaluations do read back: the counting works
    assert many == few, f"reads that grow with the steps: {few} -> {many}"


def reads_of_a_stack(steps: int) -> dict:
    data = xor_data()
    spec = tl.Spec(
        steps=f"{steps}it", batch_size=20, optimizer="sgd", lr=0.05, momentum=0.9,
        eval_every=f"{steps}it",
    )  # fmt: skip
    copies = []
    for k in range(3):
        model = mlp(seed=k)
        copies.append(Copy(model, sparse_mask(model, seed=k + 1), data_seed=k, aug_seed=k + 10))
    with counting_reads() as counts:
        train_stacked(copies, data, spec)
    return dict(counts)


def test_a_stack_of_copies_reads_back_no_more_with_more_steps():
    few, many = reads_of_a_stack(20), reads_of_a_stack(600)
    assert sum(few.values()) > 0
    assert many == few, f"reads that grow with the steps: {few} -> {many}"
