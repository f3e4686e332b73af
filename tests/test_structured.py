"""Structured pruning with real removal: smaller module, same outputs as the masked original."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.metrics import parameter_count
from ticketlab.models import build
from ticketlab.pruning.structured import (
    expand,
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


def _trained_like(model):
    """Random BN statistics and affine values, so removal is tested off the init."""
    _randomise_bn(model)
    return model.eval()


@pytest.mark.parametrize(
    "name,shape,width,residual",
    [
        ("lenet_300_100", (1, 28, 28), 0.2, False),
        ("conv4", (1, 28, 28), 0.125, False),
        ("vgg11", (3, 32, 32), 0.125, False),
        ("resnet20", (1, 28, 28), 0.5, False),
        ("resnet20", (3, 32, 32), 0.5, True),
    ],
)
@pytest.mark.parametrize("how", ["l2", "redundancy"])
def test_registered_models_shrink_with_equal_outputs(name, shape, width, residual, how):
    from ticketlab.metrics import layer_macs, multiply_adds
    from ticketlab.pruning.structured import groups

    model = _trained_like(build(name, shape, 10, width=width, seed=1))
    x = torch.randn(8, *shape)
    keep = select_units(unit_scores(model, how, x=x, residual=residual), 0.5)
    assert set(keep) == {g.key for g in groups(model, residual)}
    mask = expand(model, keep)
    masked = copy.deepcopy(model)
    mask.apply_(masked)
    small = remove_units(model, keep).eval()
    with torch.no_grad():
        # float64, so 20 layers of float32 summation order do not blur the check
        torch.testing.assert_close(
            small.double()(x.double()), masked.double()(x.double()), rtol=1e-5, atol=1e-5
        )
        assert float((small.float()(x) - masked.float()(x)).abs().max()) < 1e-3
    # the smaller model's parameters are exactly the kept ones, and its multiply-adds
    # are what the masked model's layers would spend on the surviving connections
    assert parameter_count(small) < parameter_count(model)
    macs = layer_macs(model, shape)
    kept = {n: float(m.float().mean()) for n, m in mask.items()}
    expected = sum(macs[n] * kept[n] for n in macs)
    assert multiply_adds(small, shape) == pytest.approx(expected, rel=1e-9)
    n_prunable = sum(int(m.sum()) for _, m in mask.items())
    small_weights = sum(p.numel() for n, p in small.named_parameters() if n in mask.names())
    assert small_weights == n_prunable


def test_resnet_inner_only_by_default_and_streams_shared():
    from ticketlab.pruning.structured import groups

    model = build("resnet20", (3, 32, 32), 10, width=0.5)
    inner = groups(model)
    assert [g.producers for g in inner] == [(f"blocks.{i}.conv1",) for i in range(9)]
    streams = groups(model, residual=True)[9:]
    assert len(streams) == 3  # one per stage
    assert streams[0].producers[0] == "conv" and "fc" in streams[2].consumers
    assert streams[1].producers[0] == "blocks.3.shortcut.0"
    keep = select_units(unit_scores(model, "l1", residual=True), 0.5)
    small = remove_units(model, keep)
    widths = {small.blocks[i].conv2.out_channels for i in range(3)}
    assert widths == {int(keep[streams[0].key].sum())}


def test_global_allocation_and_bn_scale_alias():
    from ticketlab.pruning.structured import canonical_unit_criterion

    assert canonical_unit_criterion("bn-scale") == "bn"
    scores = {"a": torch.tensor([5.0, 4.0, 0.1]), "b": torch.tensor([0.2, 0.3, 0.0])}
    keep = select_units(scores, 0.5, "global")
    # top 3 of 6 overall are 5, 4, 0.3; layer b keeps its best unit anyway
    assert keep["a"].tolist() == [True, True, False]
    assert keep["b"].tolist() == [False, True, False]
    keep = select_units(scores, 1 / 6, "global")
    assert keep["b"].tolist() == [False, True, False]  # never empty
    with pytest.raises(UsageError):
        select_units(scores, 0.5, "nope")
    with pytest.raises(UsageError):
        unit_scores(build("lenet_300_100", (1, 28, 28), 10), "bn")


def test_python_api_shrink():
    import ticketlab as tl

    model = _trained_like(build("vgg11", (1, 16, 16), 10, width=0.125))
    small, keep = tl.shrink(model, "bn-scale", density=0.25, allocation="global")
    x = torch.randn(4, 1, 16, 16)
    masked = copy.deepcopy(model)
    expand(model, keep).apply_(masked)
    with torch.no_grad():
        torch.testing.assert_close(small.double()(x.double()), masked.double()(x.double()))
    kept = sum(int(m.sum()) for m in keep.values())
    assert kept == round(0.25 * sum(m.numel() for m in keep.values()))


def test_custom_activations_are_refused():
    from ticketlab.models.kwinners import KWinners

    for name in ("lenet_300_100", "resnet20"):
        act = lambda s: KWinners(math.prod(s), 0.5)  # noqa: E731
        model = build(name, (1, 28, 28), 10, width=0.25, activation=act)
        with pytest.raises(UsageError, match="custom activations"):
            unit_scores(model, "l1")
