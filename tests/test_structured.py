"""Structured pruning with real removal: smaller module, same outputs as the masked original."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.pruning.structured import (
    expand,
    parameter_count,
    remove_units,
    select_units,
    unit_layers,
    unit_scores,
)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 10), nn.BatchNorm1d(10), nn.Sigmoid(),
        nn.Linear(10, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def _convnet():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()),
        nn.Conv2d(6, 5, 3), nn.BatchNorm2d(5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(5 * 3 * 3, 4),
    )  # fmt: skip


def _randomise_bn(model):
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            with torch.no_grad():
                m.weight.uniform_(0.1, 2.0)
                m.bias.uniform_(-1, 1)
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)


@pytest.mark.parametrize(
    "make,x", [(_mlp, torch.randn(32, 6)), (_convnet, torch.randn(16, 2, 8, 8))]
)
@pytest.mark.parametrize("how", ["l1", "bn", "redundancy"])
def test_removal_matches_masked_original(make, x, how):
    model = make()
    _randomise_bn(model)
    model.eval()
    scores = unit_scores(model, how, x=x)
    assert list(scores) == unit_layers(model)
    keep = select_units(scores, 0.5)
    masked = copy.deepcopy(model)
    expand(model, keep).apply_(masked)
    small = remove_units(model, keep).eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-5)
    assert parameter_count(small) < parameter_count(model)
    for m in keep.values():
        assert int(m.sum()) == max(1, round(0.5 * m.numel()))


def test_l1_and_redundancy_definitions():
    model = _mlp().eval()
    s = unit_scores(model, "l1")
    torch.testing.assert_close(s["0.weight"], model[0].weight.detach().abs().sum(1))
    # redundancy: a unit that duplicates another adds nothing new; a dead unit scores 0
    lin = nn.Linear(3, 4)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
        lin.weight[0, 0] = lin.weight[1, 0] = 1.0
        lin.weight[2, 1] = 2.0
    net = nn.Sequential(lin, nn.Linear(4, 2))
    r = unit_scores(net, "redundancy", x=torch.randn(200, 3), energy=1.0)["0.weight"]
    assert r[3] == pytest.approx(0.0, abs=1e-9)
    assert float(r.sum()) == pytest.approx(1.0, abs=1e-5)


def test_bad_input():
    with pytest.raises(UsageError):
        unit_scores(_mlp(), "nope")
    with pytest.raises(UsageError):
        unit_scores(_mlp(), "redundancy")
    with pytest.raises(UsageError):
        unit_scores(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "bn")
    with pytest.raises(UsageError):
        remove_units(_mlp(), {"0.weight": torch.zeros(10, dtype=torch.bool)})
    with pytest.raises(UsageError):
        remove_units(_mlp(), {"6.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(UsageError):
        unit_scores(nn.Linear(2, 2), "l1")
