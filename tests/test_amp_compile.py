"""Mixed precision (--amp bf16) and torch.compile (--compile): pruned weights stay exactly
zero through Adam and weight decay, and the training is the float32 eager one to the
precision each allows."""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from conftest import run_cli
from ticketlab.data import load
from ticketlab.masks import Mask
from ticketlab.models import build
from ticketlab.runs import read_csv
from ticketlab.spec import Spec
from ticketlab.train import train


def _setup():
    data = load("xor", val_size=64, split_seed=0)
    model = build("mlp_32_16", data.input_shape, data.num_classes, 1.0, "kaiming_normal", 0)
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(m.shape, generator=g) < 0.3 for n, m in Mask.dense(model).items()})
    return data, model, mask


def _pruned_are_zero(model, mask):
    named = dict(model.named_parameters())
    return all(torch.count_nonzero(named[n][~m]) == 0 for n, m in mask.items())


def test_bf16_keeps_pruned_weights_zero_and_tracks_float32():
    data, model, mask = _setup()
    spec = Spec(steps="60it", eval_every="30it", batch_size=32, weight_decay=1e-3)
    fp32, bf16 = copy.deepcopy(model), copy.deepcopy(model)
    a = train(fp32, data, spec, mask)
    b = train(bf16, data, Spec(**{**spec.__dict__, "amp": "bf16"}), mask)
    assert _pruned_are_zero(bf16, mask)
    for p in bf16.parameters():
        assert p.dtype == torch.float32  # master weights stay float32
    # bf16 keeps 8 bits of mantissa: the same training to a few percent
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=0.1)
    assert not all(torch.equal(p, q) for p, q in zip(fp32.parameters(), bf16.parameters()))


def test_compile_keeps_masks_exact_and_matches_eager(monkeypatch):
    # dynamo's capture and AOT autograd as --compile runs them; the C++ code generation
    # of the default backend is left out to keep the test short
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    from torch._dynamo.utils import counters

    data, model, mask = _setup()
    spec = Spec(steps="30it", eval_every="30it", batch_size=32, weight_decay=1e-3)
    eager, compiled = copy.deepcopy(model), copy.deepcopy(model)
    torch._dynamo.reset()
    counters.clear()
    a = train(eager, data, spec, mask)
    b = train(compiled, data, Spec(**{**spec.__dict__, "compile": True}), mask)
    assert counters["stats"]["unique_graphs"] >= 1  # the forward was captured
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert _pruned_are_zero(compiled, mask)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(q, p, atol=1e-5, rtol=1e-4)
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-4)


def test_amp_is_part_of_the_run_and_bad_values_are_refused(tmp_path, capsys):
    args = ["train", "--dataset", "xor", "--model", "mlp_16", "--steps", "20it", "--quiet"]
    rc, _, err = run_cli(capsys, *args, "--amp", "fp8", "--runs-dir", tmp_path / "bad")
    assert rc == 2 and "none, bf16" in err and not (tmp_path / "bad").exists()
    for amp in ("none", "bf16"):
        rc, _, err = run_cli(capsys, *args, "--amp", amp, "--runs-dir", tmp_path / "runs")
        assert rc == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2  # bf16 is another experiment: its own directory
    assert all(read_csv(r / "results.csv")[0]["status"] == "done" for r in runs)
