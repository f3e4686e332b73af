"""The L0 hard-concrete gates criterion (Louizos, Welling & Kingma 2018).

Tiny models and a few hundred Adam steps at most, so each check takes well under a second.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import run_cli
from ticketlab.data import from_tensors
from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.pruning import CRITERIA, Context
from ticketlab.pruning.criteria import gate_open_probability, hard_concrete

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]


def tiny_data(n=12):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, generator=g)
    y = torch.arange(n) % 2
    return from_tensors(x, y, x[:4], y[:4], num_classes=2)


def gates(model, mask=None, data=None, seed=0, **options):
    data = data if data is not None else tiny_data()
    ctx = Context(
        data=data,
        batches=1,
        batch_size=len(data.y_train),
        generator=torch.Generator().manual_seed(seed),
        options=options,
    )
    return CRITERIA["gates"](model, mask if mask is not None else Mask.dense(model), ctx)


def bn_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))


def relevant_inputs_case():
    """Labels depend on inputs 0 and 1 only; all six weights of each row have magnitude 1,
    those on the relevant inputs point the right way, the rest add noise to the logits."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 6, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(6, 2, bias=False))
    w = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])
    with torch.no_grad():
        model[0].weight.copy_(torch.stack([-w, w]))
    return model, from_tensors(x, y, x[:8], y[:8], num_classes=2)


def test_hard_concrete_formulas():
    la = torch.tensor([-2.0, 0.0, 3.0])
    u = torch.tensor([0.2, 0.5, 0.9])
    s = torch.sigmoid((torch.log(u / (1 - u)) + la) / (2 / 3))
    torch.testing.assert_close(hard_concrete(la, u), (s * 1.2 - 0.1).clamp(0, 1))
    # P(z != 0) = P(s > gamma / (gamma - zeta)), in closed form and by sampling
    p = gate_open_probability(la)
    torch.testing.assert_close(p, torch.sigmoid(la - (2 / 3) * torch.log(torch.tensor(0.1 / 1.1))))
    us = torch.rand(200_000, 1, generator=torch.Generator().manual_seed(0)).clamp(1e-6, 1 - 1e-6)
    freq = (hard_concrete(la, us) > 0).double().mean(0)
    torch.testing.assert_close(freq, p.double(), atol=5e-3, rtol=0)


def test_gates_keep_the_useful_weights():
    model, data = relevant_inputs_case()
    scores = gates(model, data=data, gates_lambda=0.5)["0.weight"]
    assert scores.dtype == torch.float64 and ((scores >= 0) & (scores <= 1)).all()
    # magnitude cannot tell the weights apart; the learned gates can
    assert scores[:, :2].min() > 0.9 > 0.1 > scores[:, 2:].max()


def test_gates_deterministic_and_model_untouched():
    model = bn_net()
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    a = gates(model, gates_steps=30)
    assert not model.training  # the mode is restored
    assert all(p.grad is None for p in model.parameters())
    after = model.state_dict()
    # bit-identical: weights and BatchNorm buffers (running stats, batch count) alike
    assert all(torch.equal(before[k], after[k]) for k in before)
    b = gates(model, gates_steps=30)
    c = gates(model, gates_steps=30, seed=1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_gates_large_lambda_lowers_expected_l0():
    model = bn_net()

    def expected_l0(lam):
        return sum(float(s.sum()) for s in gates(model, gates_lambda=lam, gates_steps=100).values())

    small, large = expected_l0(0.0), expected_l0(20.0)
    assert large < 0.5 * small


def test_gates_per_unit_one_score_per_row():
    model = bn_net()
    scores = gates(model, gates_granularity="unit", gates_steps=30)
    for s in scores.values():
        assert torch.equal(s, s[:, :1].expand_as(s))
    assert len(torch.unique(scores["0.weight"])) > 1  # rows do differ
    # conv: one score per output channel
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 2))
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 1, 5, 5, generator=g), torch.arange(16) % 2
    data = from_tensors(x, y, x[:4], y[:4], num_classes=2)
    s = gates(conv, data=data, gates_granularity="unit", gates_steps=10)["0.weight"]
    assert s.shape == (3, 1, 3, 3)
    assert torch.equal(s, s[:, :1, :1, :1].expand_as(s))
    with pytest.raises(UsageError, match="granularity"):
        gates(model, gates_granularity="layer")


def test_gates_respect_the_mask():
    model = bn_net()
    mask = Mask.dense(model)
    mask["0.weight"][0, :2] = False
    mask["3.weight"][1, 3] = False
    scores = gates(model, mask, gates_steps=30)
    for name, m in mask.items():
        assert (scores[name][~m] == 0).all() and (scores[name][m] > 0).all()
    # a pruned weight's value plays no part: its gate is forced to 0
    other = bn_net()
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other[0].weight[0, :2] = 5.0
    again = gates(other, mask, gates_steps=30)
    assert all(torch.equal(scores[k], again[k]) for k in scores)


@pytest.mark.parametrize("when", ["init", "trained"])
def test_prune_gates_end_to_end(when, tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "prune", *XOR, "--runs-dir", tmp_path, "--criterion", "gates", "--density", "0.2",
        "--when", when, "--set", "gates_steps=20", "--set", "gates_granularity=unit",
    )  # fmt: skip
    assert rc == 0, err
    (run,) = list(tmp_path.iterdir())
    mask = Mask.load(run / "replicate-0" / "level-1" / "gates" / "mask.safetensors")
    assert mask.num_kept() == round(0.2 * mask.num_total())
    rows = (run / "results.csv").read_text().splitlines()
    assert rows[-1].startswith("prune,0,1,gates,")
    rc, _, err = run_cli(
        capsys, "prune", *XOR, "--runs-dir", tmp_path / "bad", "--criterion", "gates",
        "--density", "0.2", "--set", "gates_granularity=layer",
    )  # fmt: skip
    assert rc == 2 and "gates-granularity" in err
    assert not (tmp_path / "bad").exists()
