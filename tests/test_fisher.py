"""The trace of the Fisher information (Achille, Rovere & Soatto 2019) and ticketlab fisher."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from conftest import run_cli
from ticketlab.fisher import fisher_trace
from ticketlab.masks import Mask
from ticketlab.runs import read_csv


class TwoLogits(nn.Module):
    """Two parameters, one per class: logits (a x, b x) for a scalar input x."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.l0 = nn.Linear(1, 1, bias=False)
        self.l1 = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.l0.weight.fill_(a)
            self.l1.weight.fill_(b)

    def forward(self, x):
        return torch.cat([self.l0(x), self.l1(x)], dim=1)


def by_hand(a: float, b: float, xs) -> tuple[float, float]:
    """d log p(y|x)/da = x (1[y=0] - p0), d/db = x (1[y=1] - p1); with y ~ p the expected
    square of each is x^2 (p0 p1^2 + p1 p0^2) = x^2 p0 p1. Returns (per parameter, trace)."""
    parts = []
    for x in xs:
        p0 = 1 / (1 + math.exp(-(a - b) * x))
        parts.append(x * x * p0 * (1 - p0))
    each = sum(parts) / len(parts)
    return each, 2 * each


def test_exact_trace_on_two_parameters_matches_the_hand_computed_value():
    model = TwoLogits(1.0, -1.0)
    xs = [1.0, 2.0, -0.5]
    each, total = by_hand(1.0, -1.0, xs)
    got = fisher_trace(model, torch.tensor(xs)[:, None], exact=True)
    assert got["all"] == pytest.approx(total, rel=1e-6)
    assert got["l0"] == pytest.approx(each, rel=1e-6) and got["l1"] == pytest.approx(each, rel=1e-6)
    # x = 1: 2 p0 p1 with p0 = sigmoid(2)
    one = fisher_trace(model, torch.ones(1, 1), exact=True)["all"]
    assert one == pytest.approx(2 * 0.8807970779778823 * 0.11920292202211755, rel=1e-6)


def test_sampled_labels_estimate_the_same_trace_and_are_seeded():
    model = TwoLogits(0.7, -0.4)
    x = torch.linspace(-2, 2, 8).repeat(2500)[:, None]
    _, total = by_hand(0.7, -0.4, x[:8, 0].tolist())
    a = fisher_trace(model, x, seed=1)["all"]
    # one sampled label per example: 2 x^2 p1^2 (y = 0, prob. p0) or 2 x^2 p0^2 (y = 1);
    # the estimate is within 4 standard errors of the exact trace
    var = 0.0
    for v in x[:, 0].tolist():
        p0 = 1 / (1 + math.exp(-1.1 * v))
        v0, v1 = 2 * v * v * (1 - p0) ** 2, 2 * v * v * p0**2
        m = p0 * v0 + (1 - p0) * v1
        var += p0 * (v0 - m) ** 2 + (1 - p0) * (v1 - m) ** 2
    se = math.sqrt(var) / len(x)
    assert abs(a - total) < 4 * se and se < 0.02 * total
    assert fisher_trace(model, x, seed=1)["all"] == a
    # labels from the data instead of the model would give another value: here, always y=0
    # gives x^2 p1^2 per parameter, which the sampled estimate must not match
    p1 = [1 - 1 / (1 + math.exp(-1.1 * v)) for v in x[:8, 0].tolist()]
    wrong = 2 * sum(v * v * q * q for v, q in zip(x[:8, 0].tolist(), p1)) / 8
    assert abs(a - wrong) > 0.1 * total


def test_pruned_weights_are_left_out():
    model = TwoLogits(1.0, -1.0)
    mask = Mask(
        {
            "l0.weight": torch.ones(1, 1, dtype=torch.bool),
            "l1.weight": torch.zeros(1, 1, dtype=torch.bool),
        }
    )
    each, _ = by_hand(1.0, -1.0, [1.5])
    got = fisher_trace(model, torch.tensor([[1.5]]), mask, exact=True)
    assert got["l1"] == 0.0 and got["all"] == pytest.approx(each, rel=1e-6)


def test_fisher_command_over_saved_steps(tmp_path, capsys):
    flags = ["--dataset", "mnist1d", "--steps", "60it", "--eval-every", "60it", "--levels", "1"]
    rc, _, err = run_cli(
        capsys, "lottery", *flags, "--save-every", "30it", "--quiet", "--runs-dir", tmp_path
    )
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    rc, out, err = run_cli(capsys, "fisher", run, "--examples", "64", "--out", tmp_path / "fig")
    assert rc == 0, err
    rows = read_csv(run / "fisher.csv")
    steps = {(r["level"], r["step"]) for r in rows if r["layer"] == "all"}
    assert steps == {("0", "0"), ("0", "30"), ("0", "60"), ("1", "0"), ("1", "30"), ("1", "60")}
    for key in steps:  # the total is the sum of the layers (csv keeps 6 digits)
        parts = [float(r["trace"]) for r in rows if (r["level"], r["step"]) == key]
        total = [
            float(r["trace"]) for r in rows if (r["level"], r["step"], r["layer"]) == (*key, "all")
        ]
        assert total[0] == pytest.approx(sum(parts) - total[0], rel=1e-5) and total[0] > 0
    assert (tmp_path / "fig" / "fisher.png").exists()


def test_fisher_without_saved_weights_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "train", "--dataset", "xor", "--steps", "20it", "--quiet", "--runs-dir", tmp_path
    )
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    rc, _, err = run_cli(capsys, "fisher", run)
    assert rc == 2 and "--save-every" in err and not (run / "fisher.csv").exists()
