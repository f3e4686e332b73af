"""k-winners-take-all (Ahmad & Scheinkman 2019)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.models.kwinners import KWinners, noise_robustness


def test_keeps_exactly_k_per_sample_dense_and_conv():
    torch.manual_seed(0)
    kw = KWinners(20, 5)
    x = torch.randn(8, 20)
    out = kw(x)
    assert ((out != 0).sum(1) == 5).all()
    assert torch.equal(out[out != 0], x[out != 0])  # unboosted values pass
    conv = KWinners(3 * 4 * 4, 0.25)
    xc = torch.randn(2, 3, 4, 4)
    oc = conv(xc)
    assert oc.shape == xc.shape
    assert ((oc != 0).flatten(1).sum(1) == 12).all()
    conv.eval()
    conv.k_inference = 18
    assert ((conv(xc) != 0).flatten(1).sum(1) == 18).all()


def test_boosting_changes_winners_not_values():
    kw = KWinners(4, 1, beta=10.0)
    x = torch.tensor([[1.0, 0.9, 0.1, 0.0]])
    kw.duty.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # unit 0 always won
    out = kw(x)
    assert torch.equal(out, x * torch.tensor([0.0, 1, 0, 0]))  # boost picks 1, unboosted
    kw.eval()
    assert kw(x).tolist() == [[1.0, 0.0, 0.0, 0.0]]  # no boost at inference
    kw.train()
    kw.beta = 0.0
    assert kw(x).tolist() == [[1.0, 0.0, 0.0, 0.0]]


def test_duty_cycle_and_decay():
    kw = KWinners(10, 2, duty_period=100, beta=2.0, beta_decay=0.5)
    for _ in range(20):
        kw(torch.randn(16, 10))
    assert kw.duty.sum().item() == pytest.approx(2.0, rel=1e-4)
    kw.decay_boost()
    assert kw.beta == 1.0
    with pytest.raises(UsageError):
        KWinners(10, 11)


def test_noise_robustness_runs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), KWinners(12, 3), nn.Linear(12, 2))
    x, y = torch.randn(50, 6), torch.randint(0, 2, (50,))
    acc = noise_robustness(model, x, y, scales=(0.0, 1.0))
    assert set(acc) == {0.0, 1.0} and all(0 <= a <= 1 for a in acc.values())
