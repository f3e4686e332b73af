"""Label noise (He et al. 2022) and weights saved over training (--save-every)."""

from __future__ import annotations

import pytest
import torch

from conftest import run_cli
from ticketlab.data import load, noisy_labels
from ticketlab.errors import UsageError
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.runs import load_state, read_json
from ticketlab.spec import Spec, identity, spec_hash
from ticketlab.train import saved_steps


@pytest.mark.parametrize("p", [0.0, 0.1, 0.37, 0.5])
def test_noise_rate_is_exact_and_changed_labels_differ(p):
    y = torch.randint(0, 10, (1001,), generator=torch.Generator().manual_seed(1))
    noisy = noisy_labels(y, 10, p, seed=3)
    changed = noisy != y
    assert int(changed.sum()) == round(p * len(y))
    assert noisy.min() >= 0 and noisy.max() < 10
    # every label picked for noise lands on another class: none is "changed" to itself
    assert torch.equal(noisy[~changed], y[~changed])


def test_noise_is_seeded_and_spread_over_the_other_classes():
    y = torch.zeros(20000, dtype=torch.int64)
    a, b, c = (noisy_labels(y, 4, 0.3, seed=s) for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    counts = torch.bincount(a[a != 0], minlength=4)[1:].float()
    assert counts.sum() == 6000 and (counts / 2000 - 1).abs().max() < 0.1  # uniform over 1..3


def test_only_training_labels_change():
    clean = load("mnist1d", split_seed=0)
    noisy = load("mnist1d", split_seed=0, label_noise=0.2, noise_seed=5)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(clean, f"x_{split}"), getattr(noisy, f"x_{split}"))
    assert torch.equal(clean.y_val, noisy.y_val) and torch.equal(clean.y_test, noisy.y_test)
    n = len(clean.y_train)
    assert int((clean.y_train != noisy.y_train).sum()) == round(0.2 * n)


def test_label_noise_is_hashed_only_when_nonzero(tmp_path):
    base = identity(Spec(), 900)
    assert spec_hash(identity(Spec(label_noise=0.0), 900)) == spec_hash(base)
    assert "label_noise" not in base
    assert identity(Spec(label_noise=0.2), 900)["label_noise"] == 0.2
    with pytest.raises(UsageError):
        Spec(label_noise=1.0)


def test_experiment_trains_on_the_noisy_labels(tmp_path):
    spec = Spec(dataset="mnist1d", label_noise=0.25, seed=2, runs_dir=str(tmp_path))
    exp = LotteryExperiment(spec)  # loads the data, writes nothing
    clean = load("mnist1d", split_seed=2)
    assert int((exp.data.y_train != clean.y_train).sum()) == round(0.25 * len(clean.y_train))
    assert torch.equal(exp.data.y_test, clean.y_test)
    assert not any(tmp_path.iterdir())


def test_bad_label_noise_is_a_usage_error(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "lottery", "--label-noise", "-0.1", "--runs-dir", tmp_path)
    assert rc == 2 and "label noise" in err and not any(tmp_path.iterdir())


def test_save_every_writes_its_steps_and_keeps_the_hash(tmp_path, capsys):
    flags = ["--dataset", "mnist1d", "--steps", "130it", "--eval-every", "65it", "--levels", "1"]
    flags += ["--rewind", "20it", "--quiet"]
    rc, _, err = run_cli(capsys, "lottery", *flags, "--runs-dir", tmp_path / "a")
    assert rc == 0, err
    rc, _, err = run_cli(
        capsys, "lottery", *flags, "--save-every", "40it", "--runs-dir", tmp_path / "b"
    )
    assert rc == 0, err
    (a,), (b,) = (tmp_path / "a").iterdir(), (tmp_path / "b").iterdir()
    assert a.name == b.name  # the same run: save-every is not hashed
    dense = b / "replicate-0" / "level-0" / "ticket"
    ticket = b / "replicate-0" / "level-1" / "ticket"
    assert saved_steps(dense) == [0, 40, 80, 120]
    assert saved_steps(ticket) == [40, 80, 120]  # trained from the rewind point 20 on
    assert not (a / "replicate-0" / "level-0" / "ticket" / "saved").exists()
    # what was trained is the same, and the saved weights are the run's own
    for run in (a, b):
        assert read_json(run / "spec.json")["hash"] == a.name.split("-")[1]
    end_a = load_state(a / "replicate-0" / "level-1" / "ticket" / "weights_end.safetensors")
    end_b = load_state(ticket / "weights_end.safetensors")
    assert all(torch.equal(end_a[k], end_b[k]) for k in end_a)
    start = load_state(dense / "weights_start.safetensors")
    at0 = load_state(dense / "saved" / "step-0.safetensors")
    assert all(torch.equal(start[k], at0[k]) for k in start)
    at40 = load_state(ticket / "saved" / "step-40.safetensors")
    mask_zero = [(at40[k] == 0).float().mean() for k in at40 if k.endswith("weight")]
    assert max(mask_zero) > 0.15  # the ticket's pruned weights stay pruned in the saved file


def test_double_descent_points_on_hand_made_curves():
    from ticketlab.analysis import double_descent_points

    # dense to sparse: falls (overfitting the noise), rises (sweet spot), falls (collapse)
    assert double_descent_points([80.0, 78.0, 75.0, 79.0, 82.0, 70.0]) == (0, 2, 4)
    # the first error minimum need not be the dense network
    assert double_descent_points([79.0, 81.0, 76.0, 77.0, 80.0]) == (1, 2, 4)
    assert double_descent_points([80.0, 79.0, 78.0, 70.0]) is None  # monotone
    assert double_descent_points([80.0, 79.5, 80.2, 70.0], spread=[1.0] * 4) is None  # noise
    assert double_descent_points([80.0, 79.5, 80.2, 70.0], spread=[0.1] * 4) == (0, 1, 2)


def test_report_marks_double_descent_for_noisy_lottery_runs(tmp_path, capsys):
    flags = ["--dataset", "mnist1d", "--steps", "40it", "--eval-every", "40it", "--levels", "2"]
    for noise in ("0.3", "0"):
        rc, _, err = run_cli(capsys, "lottery", *flags, "--label-noise", noise, "--quiet",
                             "--runs-dir", tmp_path / "runs")  # fmt: skip
        assert rc == 0, err
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2  # noise is part of the identity
    rc, _, err = run_cli(capsys, "report", *runs, "--out", tmp_path / "rep", "--quiet")
    assert rc == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert "Sparse double descent" in page and "<td>0.3</td>" in page
    assert (tmp_path / "rep" / "double_descent.png").exists()


def test_saved_weights_of_a_resumed_phase_equal_an_uninterrupted_one(tmp_path):
    from ticketlab.data import from_tensors
    from ticketlab.errors import RunInterrupted
    from ticketlab.models import build
    from ticketlab.train import request_stop, stop_on_signals, train

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=g)
    data = from_tensors(x[:240], (x[:240, 0] > 0).long(), x[240:], (x[240:, 0] > 0).long())
    spec = Spec(dataset="custom", steps="50it", eval_every="20it", batch_size=16,
                save_every="10it", checkpoint_every="1000it", checkpoint_seconds=0)  # fmt: skip

    class StopAt:
        def __init__(self, at):
            self.at = at

        def after_step(self, step, *args):
            if step + 1 == self.at:
                request_stop()

    def model():
        return build("lenet_300_100", (8,), 2, 0.1, "xavier_normal", 3)

    train(model(), data, spec, workdir=tmp_path / "whole")
    with stop_on_signals(), pytest.raises(RunInterrupted):
        train(model(), data, spec, workdir=tmp_path / "split", callbacks=[StopAt(25)])
    assert saved_steps(tmp_path / "split") == [0, 10, 20]
    train(model(), data, spec, workdir=tmp_path / "split", callbacks=[StopAt(-1)])
    assert (
        saved_steps(tmp_path / "split")
        == saved_steps(tmp_path / "whole")
        == [0, 10, 20, 30, 40, 50]
    )
    for s in (0, 10, 20, 30, 40, 50):
        a = load_state(tmp_path / "whole" / "saved" / f"step-{s}.safetensors")
        b = load_state(tmp_path / "split" / "saved" / f"step-{s}.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), s
