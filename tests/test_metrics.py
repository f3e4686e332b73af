"""Sparsity metrics on hand-built masks: compression ratio, FLOPs speedup, effective density."""

from __future__ import annotations

import math

import torch
from torch import nn

from ticketlab.masks import Mask
from ticketlab.metrics import (
    compression_ratio,
    effective_density,
    effective_mask,
    flops_speedup,
)
from ticketlab.models import build


def mlp() -> nn.Module:
    """2 -> 3 -> 2 MLP: 6 + 3 + 6 + 2 = 17 parameters, 12 prunable weights."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))


def test_compression_ratio_counts_all_parameters():
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()  # 6 of 17 zero: 11 nonzero
    assert compression_ratio(model) == 17 / 11


def test_flops_speedup_weights_each_layer_by_its_macs():
    model = mlp()
    mask = Mask.dense(model)
    assert flops_speedup(model, mask, (2,)) == 1.0
    m0 = mask["0.weight"].clone()
    m0.view(-1)[:3] = False  # layer 0 at density 1/2: 3 + 6 remaining of 12
    assert flops_speedup(model, Mask({"0.weight": m0, "2.weight": mask["2.weight"]}), (2,)) == (
        12 / 9
    )


def test_unit_without_inputs_makes_its_outputs_ineffective(capsys):
    model = mlp()
    m0 = torch.ones(3, 2, dtype=torch.bool)
    m0[1] = False  # hidden unit 1 has no incoming kept weights
    m2 = torch.ones(2, 3, dtype=torch.bool)
    mask = Mask({"0.weight": m0, "2.weight": m2})
    eff = effective_mask(model, mask)
    assert eff["0.weight"].equal(m0)
    assert not eff["2.weight"][:, 1].any() and eff["2.weight"][:, [0, 2]].all()
    assert effective_density(model, mask) == (4 + 4) / 12
    assert "layer collapse" not in capsys.readouterr().err


def test_unit_without_outputs_makes_its_inputs_ineffective():
    model = mlp()
    m0 = torch.ones(3, 2, dtype=torch.bool)
    m2 = torch.ones(2, 3, dtype=torch.bool)
    m2[:, 2] = False  # hidden unit 2 reaches no output
    eff = effective_mask(model, Mask({"0.weight": m0, "2.weight": m2}))
    assert not eff["0.weight"][2].any() and eff["0.weight"][:2].all()


def test_layer_collapse_warns_on_stderr(capsys):
    model = mlp()
    m0 = torch.ones(3, 2, dtype=torch.bool)
    m2 = torch.zeros(2, 3, dtype=torch.bool)  # output layer cut: nothing is on a path
    assert effective_density(model, Mask({"0.weight": m0, "2.weight": m2})) == 0.0
    err = capsys.readouterr().err
    assert "layer collapse: layer 0.weight has no effective weights" in err
    assert "layer collapse: layer 2.weight" in err


def test_conv_net_channels_and_flatten():
    model = build("conv2", (1, 4, 4), 2, 1.0, "kaiming_normal", 0)
    mask = Mask.dense(model)
    assert effective_density(model, mask) == 1.0
    names = mask.names()
    conv1, conv2, fc1 = names[0], names[1], names[2]
    masks = {n: m.clone() for n, m in mask.items()}
    masks[conv1][3] = False  # channel 3 of the first conv gets no input
    eff = effective_mask(model, Mask(masks))
    assert not eff[conv2][:, 3].any()
    assert eff[conv2][:, 2].all()
    # the second conv's channel 0 feeds no kept fc weight: its kernels are ineffective
    masks = {n: m.clone() for n, m in mask.items()}
    spatial = masks[fc1].shape[1] // masks[conv2].shape[0]
    masks[fc1][:, :spatial] = False
    eff = effective_mask(model, Mask(masks))
    assert not eff[conv2][0].any() and eff[conv2][1].all()
    assert effective_density(model, Mask(masks)) < Mask(masks).density()


def test_residual_net_is_nan():
    model = build("resnet20", (3, 8, 8), 2, 0.25, "kaiming_normal", 0)
    assert math.isnan(effective_density(model, Mask.dense(model)))


def test_inference_speedup_leaves_modes_and_outputs_alone():
    """A measurement (no time is asserted): a positive ratio, modes and weights untouched."""
    from ticketlab.metrics import inference_speedup

    torch.manual_seed(0)
    big = nn.Sequential(nn.Linear(8, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 2))
    small = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in big.state_dict().items()}
    ratio = inference_speedup(big, small, torch.randn(16, 8), rounds=3)
    assert 0 < ratio < float("inf")
    assert big.training and not small.training
    assert all(torch.equal(big.state_dict()[k], v) for k, v in before.items())
