"""Mask overlap, sign agreement, instability and layer re-initialisation on hand-built cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ticketlab import analysis
from ticketlab.data import from_tensors
from ticketlab.masks import Mask


def masks():
    a = Mask({"w": torch.tensor([1, 1, 0, 0], dtype=torch.bool), "v": torch.tensor([[1, 0]])})
    b = Mask({"w": torch.tensor([1, 0, 1, 0], dtype=torch.bool), "v": torch.tensor([[1, 1]])})
    return a, b


def test_jaccard_and_hamming_on_hand_built_masks():
    a, b = masks()
    # kept: a = {w0, w1, v0}, b = {w0, w2, v0, v1}; both {w0, v0}; either: 5 positions
    assert analysis.jaccard(a, b) == pytest.approx(2 / 5)
    # differ at w1, w2, v1 out of 6 positions
    assert analysis.hamming(a, b) == pytest.approx(3 / 6)
    assert analysis.jaccard_per_layer(a, b) == pytest.approx({"w": 1 / 3, "v": 1 / 2})
    assert analysis.hamming_per_layer(a, b) == pytest.approx({"w": 2 / 4, "v": 1 / 2})
    assert analysis.jaccard(a, a) == 1.0 and analysis.hamming(a, a) == 0.0
    with pytest.raises(Exception, match="different layers"):
        analysis.jaccard(a, Mask({"w": a["w"]}))


def test_sign_agreement_counts_kept_weights_only():
    mask = Mask({"w": torch.tensor([1, 1, 1, 0], dtype=torch.bool)})
    init = {"w": torch.tensor([1.0, -1.0, 2.0, 5.0])}
    final = {"w": torch.tensor([3.0, 1.0, 0.5, -5.0])}  # the flip at w3 is pruned
    assert analysis.sign_agreement(final, init, mask) == pytest.approx(2 / 3)


def test_instability_definition():
    assert analysis.instability([0.1, 0.5, 0.1]) == pytest.approx(0.4)
    assert analysis.instability([0.1, 0.1, 0.3]) == pytest.approx(0.1)  # max at an endpoint


def _xor_like():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = (x[:, 0] > 0).long()
    return from_tensors(x[:300], y[:300], x[300:], y[300:], val_size=50)


def _net():
    return nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))


def test_instability_zero_for_identical_copies_and_positive_for_a_barrier():
    data = _xor_like()
    model = _net()
    with torch.no_grad():
        # hidden units relu(x0), relu(-x0); class 1 reads the first, class 0 the second
        model[0].weight.copy_(torch.tensor([[10.0, 0.0], [-10.0, 0.0]]))
        model[0].bias.zero_()
        model[2].weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
        model[2].bias.zero_()
    a = {k: v.clone() for k, v in model.state_dict().items()}
    # the same function with the hidden units swapped: the midpoint averages them away
    b = dict(a)
    b["0.weight"] = a["0.weight"].flip(0)
    b["2.weight"] = a["2.weight"].flip(1)
    same = analysis.interpolation_path(model, a, a, data, points=7)
    errors = [p["test_error"] for p in same]
    assert errors == [errors[0]] * 7 and analysis.instability(errors) == 0.0
    path = analysis.interpolation_path(model, a, b, data, points=7)
    errors = [p["test_error"] for p in path]
    assert errors[0] == errors[-1] < 0.05
    assert analysis.instability(errors) > 0.3
    assert max(range(7), key=errors.__getitem__) == 3  # the barrier is at alpha = 0.5
    assert all(p["bn_batches"] == 0 for p in path)  # no BatchNorm here


def test_batchnorm_stats_recomputed_on_fixed_batches():
    data = _xor_like()
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2))
    model[1].running_mean.fill_(100.0)
    used = analysis.recompute_bn(model, data, batches=2, batch_size=50, seed=1)
    assert used == 2
    from ticketlab.data import BatchSampler

    s = BatchSampler(len(data.y_train), 50, 1)
    x = torch.cat([data.x_train[s.indices(i)] for i in range(2)])
    with torch.no_grad():
        h = model[0](x)
    assert torch.allclose(model[1].running_mean, h.mean(0), atol=1e-5)
    assert model[1].momentum == 0.1  # restored
    path = analysis.interpolation_path(
        model, model.state_dict(), model.state_dict(), data, 3, 2, 50
    )
    assert [p["bn_batches"] for p in path] == [2, 2, 2]


def test_layer_reinit_changes_only_the_chosen_layer():
    data = _xor_like()
    model = _net()
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    zeros = {k: torch.zeros_like(v) for k, v in trained.items()}
    rows = analysis.layer_reinit(model, trained, zeros, zeros, data)
    assert [(r["layer"], r["reset"]) for r in rows] == [
        ("none", "none"),
        ("0.weight", "initial"),
        ("0.weight", "random"),
        ("2.weight", "initial"),
        ("2.weight", "random"),
    ]
    # a zeroed output layer predicts class 0 everywhere
    frac0 = float((data.y_test == 0).float().mean())
    assert rows[3]["test_accuracy"] == pytest.approx(frac0)
    assert torch.equal(model.state_dict()["0.weight"], trained["0.weight"])  # restored
