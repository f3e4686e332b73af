"""Forward-pass masks: same outputs as in-place masks, dense weights kept."""

from __future__ import annotations

import copy

import pytest
import torch

import ticketlab as tl
from ticketlab.errors import UsageError
from ticketlab.masks import Mask, prunable_weights
from ticketlab.masks.forward import attach, kept_count, score_init
from ticketlab.protocols import random_mask, snapshot

MODELS = [("conv2", (1, 12, 12)), ("lenet_300_100", (1, 8, 8))]


def build(name="conv2", shape=(1, 12, 12), seed=0):
    return tl.models.build(name, shape, 10, width=0.1, seed=seed)


def half_mask(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    weights = prunable_weights(model)
    return Mask({k: torch.rand(w.shape, generator=gen) < 0.5 for k, w in weights.items()})


@pytest.mark.parametrize("name,shape", MODELS)
def test_forward_equals_in_place(name, shape):
    model = build(name, shape)
    mask = half_mask(model)
    x = torch.randn(5, *shape)
    inplace = mask.apply_(copy.deepcopy(model))
    before = snapshot(model)
    h = attach(model, mask)
    assert torch.equal(model(x), inplace(x))
    assert h.current_mask() == mask
    assert sorted(model.state_dict()) == sorted(before)  # plain names while attached
    clone = copy.deepcopy(model)  # the masked forward is rebound to the copy
    assert torch.equal(clone(x), inplace(x))
    h.detach(bake=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])
    assert not torch.equal(model(x), inplace(x))  # dense again
    assert torch.equal(clone(x), inplace(x))  # the copy keeps its own mask
    attach(model, mask).detach(bake=True)
    assert torch.equal(model(x), inplace(x))
    assert sorted(model.state_dict()) == sorted(before)


def test_gradients_reach_kept_weights_only():
    model = build()
    mask = half_mask(model)
    h = attach(model, mask)
    model(torch.randn(4, 1, 12, 12)).square().sum().backward()
    for name, w in prunable_weights(model).items():
        assert torch.all(w.grad[~mask[name]] == 0)
        assert w.grad[mask[name]].abs().sum() > 0
    other = random_mask(mask, 3)
    h.set_mask(other)
    assert h.current_mask() == other
    h.detach()


def test_topk_scores_straight_through():
    model = build()
    weights = prunable_weights(model)
    gen = torch.Generator().manual_seed(0)
    scores = {k: score_init(w, gen) for k, w in weights.items()}
    h = attach(model, scores=scores, density=0.3)
    for w in weights.values():
        w.requires_grad_(False)
    model(torch.randn(4, 1, 12, 12)).square().sum().backward()
    mask = h.current_mask()
    for name, s in h.scores.items():
        assert int(mask[name].sum()) == kept_count(s.numel(), 0.3)
        assert s.grad is not None and s.grad.abs().sum() > 0
        # straight-through: scores of pruned weights get gradients too
        assert s.grad[~mask[name]].abs().sum() > 0
    assert any(k.endswith("weight_scores") for k in model.state_dict())
    h.detach()
    assert not any(k.endswith("weight_scores") for k in model.state_dict())


def test_bernoulli_expected_and_sampled():
    model = build("lenet_300_100", (1, 8, 8))
    scores = {k: torch.zeros(w.shape) for k, w in prunable_weights(model).items()}
    h = attach(model, scores=scores, mode="bernoulli", rescale=True)
    model.train()
    model(torch.randn(3, 1, 8, 8)).sum().backward()
    assert all(s.grad.abs().sum() > 0 for s in h.scores.values())
    assert h.expected_density() == pytest.approx(0.5)
    h.detach()


def test_bad_input():
    model = build()
    with pytest.raises(UsageError):
        attach(model, mode="topk")
    h = attach(model)
    with pytest.raises(UsageError):
        attach(model)  # twice
    h.detach()
    with pytest.raises(UsageError):
        h.current_mask()
