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


class _Recorder(nn.Module):
    """Logits from nothing; keeps every input it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x):
        self.seen.append(x.clone())
        return torch.zeros(x.shape[0], 2)


def test_noise_sets_a_fixed_count_of_pixels_to_a_bright_value():
    """Ahmad & Scheinkman's noise: per example, int(eta * pixels) distinct pixels chosen
    at random are set to the training mean + 2 std; the rest are untouched."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.zeros(40, dtype=torch.long)
    model = _Recorder()
    levels = (0.0, 0.05, 0.15, 0.5)
    noise_robustness(model, x, y, levels, seed=3)  # the default kind: the paper's
    bright = float(x.mean() + 2 * x.std(correction=0))  # of the inputs when no value given
    assert len(model.seen) == len(levels)
    picked = []
    for eta, noisy in zip(levels, model.seen):
        changed = (noisy != x).flatten(1)
        assert (changed.sum(1) == int(eta * 784)).all(), eta  # 0, 39, 117, 392 per example
        assert torch.allclose(noisy.flatten(1)[changed], torch.tensor(bright))
        picked.append(changed)
    assert not torch.equal(picked[2][0], picked[2][1])  # each example its own pixels
    # an explicit value (the experiment passes the training set's), per channel
    model.seen.clear()
    x3 = torch.randn(8, 3, 4, 4, generator=g)
    value = torch.tensor([2.0, 3.0, 4.0])
    noise_robustness(model, x3, y[:8], (0.25,), seed=1, value=value)
    (noisy,) = model.seen
    changed = noisy != x3
    assert (changed.flatten(1).sum(1) == 12).all()  # a quarter of the 48 values
    for c in range(3):
        assert (noisy[:, c][changed[:, c]] == value[c]).all()


def test_gaussian_noise_kind_is_the_old_one():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 6, generator=g), torch.randint(0, 2, (30,), generator=g)
    model = _Recorder()
    noise_robustness(model, x, y, (0.0, 0.4), seed=5, kind="gaussian")
    gen = torch.Generator().manual_seed(5)
    std = float(x.std())
    assert torch.equal(model.seen[0], x + 0.0 * std * torch.randn(x.shape, generator=gen))
    assert torch.equal(model.seen[1], x + 0.4 * std * torch.randn(x.shape, generator=gen))
    with pytest.raises(UsageError):
        noise_robustness(model, x, y, (1.5,))  # a fraction of pixels
    with pytest.raises(UsageError):
        noise_robustness(model, x, y, (0.1,), kind="salt")


def test_conv_duty_cycles_and_boosting_are_per_channel():
    """As in the paper's KWinners2d: one duty cycle per channel, the fraction of that
    channel's H x W units among the winners, and one boost factor per channel; the k
    winners are still taken over all C x H x W units."""
    from ticketlab.models.kwinners import kwinners_factory

    kw = kwinners_factory(0.25, 1.0, beta=0.0)((4, 3, 3))  # k = 9 of 36
    assert kw.k == 9 and kw.duty.shape == (4,)
    x = torch.zeros(2, 4, 3, 3)
    x[:, 1].view(2, -1)[:, :5] = torch.tensor([9.0, 8, 7, 6, 5])  # 5 winners in channel 1
    x[:, 2].view(2, -1)[:, :4] = torch.tensor([4.0, 3, 2, 1])  # and 4 in channel 2
    kw.train()
    out = kw(x)
    assert ((out != 0).flatten(1).sum(1) == 9).all()
    assert torch.allclose(kw.duty, torch.tensor([0.0, 5 / 9, 4 / 9, 0.0]))
    kw.beta = 10.0
    boost = kw.boost().reshape(4, 9)
    assert torch.allclose(boost, boost[:, :1].expand(4, 9))  # one factor per channel
    want = torch.exp(10.0 * (0.25 - torch.tensor([0.0, 5 / 9, 4 / 9, 0.0])))
    assert torch.allclose(boost[:, 0], want.to(boost.dtype))
    # boosted: channels 1 and 2 won too often, so none of their units win now (their
    # units that lost before are not favoured one by one)
    x2 = 1 + 0.01 * torch.rand(3, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    win = kw(x2) != 0
    assert not win[:, 1:3].any() and (win.flatten(1).sum(1) == 9).all()
    # the old per-unit duty cycles stay an option
    unit = kwinners_factory(0.25, 1.0, beta=0.0, duty_cycles="unit")((4, 3, 3))
    assert unit.duty.shape == (36,)
    dense = kwinners_factory(0.25)((12,))  # a dense layer: per unit either way
    assert dense.duty.shape == (12,)
