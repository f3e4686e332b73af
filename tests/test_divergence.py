"""A phase whose loss becomes non-finite is reported as diverged, not recorded as a result."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from ticketlab.data import load
from ticketlab.errors import Diverged
from ticketlab.models import build
from ticketlab.runs import read_csv
from ticketlab.spec import Spec
from ticketlab.train import train

COMMON = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "16", "--quiet"]


def test_train_raises_at_the_next_evaluation_with_the_first_bad_step():
    data = load("xor")
    model = build("mlp_16", data.input_shape, data.num_classes)
    spec = Spec(dataset="xor", model="mlp_16", batch_size=16, steps="40it", eval_every="10it")

    class Poison:  # makes the weights NaN after step index 13, so step 14's loss is NaN
        def after_step(self, step, model, optimizer, keeper, x, y):
            if step == 13:
                with torch.no_grad():
                    next(model.parameters()).fill_(float("nan"))

    with pytest.raises(Diverged) as info:
        train(model, data, spec, callbacks=[Poison()], label="poisoned")
    exc = info.value
    assert exc.step == 14
    assert exc.metrics["step"] == 10  # the last evaluation before it, all finite
    assert all(v == v for v in exc.metrics.values())  # no NaN


def test_lr_1e8_is_diverged_exits_1_and_is_not_retried(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["lottery", *COMMON, "--steps", "30it", "--eval-every", "10it", "--levels", "2"]
    args += ["--optimizer", "sgd", "--lr", "1e8", "--runs-dir", runs]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1
    assert "level 0 ticket" in err and "diverged" in err and "at step" in err
    (run,) = runs.iterdir()
    rows = read_csv(run / "results.csv")
    assert [r["status"] for r in rows] == ["diverged"]  # later levels were not run
    row = rows[0]
    assert int(row["diverged_step"]) >= 0 and row["last_finite_step"] != ""
    assert not (run / "replicate-0" / "level-1").exists()
    stored = json.loads((run / "replicate-0" / "level-0" / "ticket" / "result.json").read_text())
    assert stored["status"] == "diverged"
    # show marks it
    rc, out, _ = run_cli(capsys, "show", run)
    assert rc == 0 and "diverged" in out
    # resuming does not retry silently: it says how to start over
    rc, _, err = run_cli(capsys, *args)
    assert rc == 1 and "not retried" in err and "start over" in err
    assert read_csv(run / "results.csv") == rows
    # the report marks it
    rc, _, _ = run_cli(capsys, "report", run, "--out", tmp_path / "rep")
    assert rc == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Diverged" in page


def test_a_sane_lr_is_not_flagged(tmp_path, capsys):
    args = ["train", *COMMON, "--steps", "20it", "--eval-every", "10it"]
    rc, _, err = run_cli(capsys, *args, "--runs-dir", tmp_path)
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    assert [r["status"] for r in read_csv(run / "results.csv")] == ["done"]
