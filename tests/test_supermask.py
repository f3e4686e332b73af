"""Supermasks over frozen weights (edge-popup, Zhou et al.) and masks with no training."""

from __future__ import annotations

import torch
from safetensors.torch import load_file
from torch import nn

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.masks import Mask, prunable_weights
from ticketlab.masks.forward import kept_count
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.methods.supermask import SupermaskExperiment, SupermaskSpec, supermask, wrap
from ticketlab.runs import read_csv
from ticketlab.spec import Spec

COMMON = dict(dataset="mnist1d", model="mlp_64_64", optimizer="adam", batch_size=100, quiet=True)


def test_edge_popup_frozen_weights_and_exact_k(tmp_path):
    spec = SupermaskSpec(
        algorithm="edge-popup",
        density=0.3,
        steps="150it",
        eval_every="50it",
        lr=0.01,
        runs_dir=str(tmp_path),
        **COMMON,
    )
    exp = SupermaskExperiment(spec)
    rows = exp.run()
    vdir = exp.dir / "replicate-0" / "level-0" / "edge-popup"
    start = load_file(str(vdir / "weights_start.safetensors"))
    end = load_file(str(vdir / "weights_end.safetensors"))
    assert sorted(start) == sorted(end)
    for k in start:  # frozen: bit-identical (weights, biases)
        assert torch.equal(start[k], end[k]), k
    mask = Mask.load(vdir / "mask.safetensors")
    for m in mask._m.values():
        assert int(m.sum()) == kept_count(m.numel(), 0.3)
    scores = load_file(str(vdir / "scores.safetensors"))
    assert sorted(scores) == sorted(mask.names())
    assert rows[0]["test_accuracy"] > 0.2  # chance is 0.1
    assert rows[0]["density"] == mask.density()
    csv = read_csv(exp.dir / "results.csv")
    assert {"algorithm", "learned_density", "test_accuracy", "status"} <= set(csv[0])


def test_bernoulli_reports_learned_density(tmp_path):
    spec = SupermaskSpec(
        algorithm="bernoulli",
        density=0.5,
        steps="60it",
        eval_every="60it",
        lr=0.1,
        rescale=True,
        weights_kind="signed-constant",
        runs_dir=str(tmp_path),
        **COMMON,
    )
    rows = SupermaskExperiment(spec).run()
    assert 0.0 < rows[0]["learned_density"] < 1.0
    assert rows[0]["learned_density"] != 0.5


def test_bernoulli_row_scores_the_saved_binary_mask(tmp_path):
    """Zhou et al. score a supermask: accuracy, density and the saved mask are one binary mask."""
    from ticketlab.train import evaluate

    for eval_mask in ("sampled", "threshold"):
        spec = SupermaskSpec(
            algorithm="bernoulli",
            density=0.5,
            steps="40it",
            eval_every="20it",
            lr=0.1,
            eval_mask=eval_mask,
            runs_dir=str(tmp_path / eval_mask),
            **COMMON,
        )
        exp = SupermaskExperiment(spec)
        row = exp.run()[0]
        vdir = exp.dir / "replicate-0" / "level-0" / "bernoulli"
        mask = Mask.load(vdir / "mask.safetensors")
        scores = load_file(str(vdir / "scores.safetensors"))
        if eval_mask == "threshold":
            for k, s in scores.items():
                assert torch.equal(mask[k], s > 0)
        else:  # a draw, not the threshold: some kept weights have sigmoid(s) < 0.5
            assert any(bool((mask[k] & (s < 0)).any()) for k, s in scores.items())
        assert row["density"] == mask.density()
        model = exp.model_fn(0)
        model.load_state_dict(load_file(str(vdir / "weights_end.safetensors")))
        mask.apply_(model)
        _, acc = evaluate(model, exp.data.x_test, exp.data.y_test, 1000)
        assert acc == row["test_accuracy"], eval_mask


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv1d(1, 4, 5)
        self.bn = nn.BatchNorm1d(4)
        self.b = nn.Linear(4 * 36, 10)

    def forward(self, x):
        return self.b(self.bn(self.a(x)).relu().flatten(1))


def test_own_module_python_api(tmp_path):
    data = tl.data.load("mnist1d")
    model = Tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    h = wrap(model, "edge-popup", 0.5, seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    assert len(opt.param_groups[0]["params"]) == 2  # the scores only
    for i in range(20):
        x, y = data.x_train[i * 50 : (i + 1) * 50], data.y_train[i * 50 : (i + 1) * 50]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    mask = h.current_mask()
    assert isinstance(mask, Mask) and abs(mask.density() - 0.5) < 0.01
    h.detach(bake=False)
    for k in prunable_weights(model):
        assert torch.equal(model.state_dict()[k], before[k])
    spec = SupermaskSpec(steps="20it", eval_every="20it", runs_dir=str(tmp_path), **COMMON)
    rows = supermask(Tiny(), data, spec)
    assert rows[0]["status"] == "done"


def test_same_sign_without_training_and_transfer(tmp_path):
    dense = LotteryExperiment(
        Spec(
            method="train",
            steps="300it",
            eval_every="300it",
            lr=0.002,
            runs_dir=str(tmp_path),
            **COMMON,
        )
    )
    dense.run()
    for kind in ("init", "signed-constant"):
        spec = SupermaskSpec(
            algorithm="same-sign",
            weights=str(dense.dir),
            density=0.5,
            weights_kind=kind,
            runs_dir=str(tmp_path),
            **COMMON,
        )
        row = SupermaskExperiment(spec).run()[0]
        assert row["steps"] == 0 and row["density"] == 0.5
        assert row["test_accuracy"] > 0.12
    spec = SupermaskSpec(
        weights=str(dense.dir), steps="20it", eval_every="20it", runs_dir=str(tmp_path), **COMMON
    )
    exp = SupermaskExperiment(spec)
    exp.run()
    trained = load_file(str(dense.dir / "replicate-0/level-0/dense/weights_end.safetensors"))
    start = load_file(str(exp.dir / "replicate-0/level-0/edge-popup/weights_start.safetensors"))
    assert all(torch.equal(trained[k], start[k]) for k in trained)


def test_cli_supermask_and_bad_input(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["supermask", "--dataset", "xor", "--model", "mlp_16", "--steps", "20it"]
    args += ["--eval-every", "20it", "--runs-dir", str(runs), "--quiet"]
    assert main(args + ["--density", "0.4"]) == 0
    (run,) = runs.glob("supermask-*")
    assert (run / "results.csv").exists()
    for bad in (["--density", "1.5"], ["--algorithm", "nope"], ["--algorithm", "same-sign"]):
        assert main(args + bad + ["--runs-dir", str(tmp_path / "bad")]) == 2
    assert (
        main(args + ["--weights", str(tmp_path / "none"), "--runs-dir", str(tmp_path / "bad")]) == 2
    )
    assert not (tmp_path / "bad").exists()
    err = capsys.readouterr().err
    assert err.count("error:") == 4
