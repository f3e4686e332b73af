"""A user's own network, data and objective: integer and structured inputs, any prunable
parameter (attention in-projections), a custom loss and metric, and image folders read
by DataLoader workers with resumable batches."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ticketlab as tl
from ticketlab.data import from_datasets, load
from ticketlab.errors import DataError, UsageError
from ticketlab.masks.forward import attach
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.runs import read_state_file

SRC = str(Path(__file__).resolve().parents[1] / "src")


class TokenNet(nn.Module):
    """Embedding + positions -> TransformerEncoderLayer -> mean over positions -> Linear."""

    def __init__(self, vocab=12, d=16, classes=3, length=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(0.5 * torch.randn(length, d))
        self.enc = nn.TransformerEncoderLayer(d, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens):
        return self.head(self.enc(self.embed(tokens) + self.pos).mean(1))


def token_data(n=240, seed=0):
    """The class is the token at position 0, modulo 3: learnable by attention."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 12, (n, 6), generator=g)
    y = x[:, 0] % 3
    return tl.from_tensors(x[:200], y[:200], x[200:], y[200:], val_size=20)


def test_integer_token_inputs_train():
    data = token_data()
    assert data.x_train.dtype == torch.int64  # kept, not turned into floats
    torch.manual_seed(0)
    model = TokenNet()
    before = tl.evaluate(model, data.x_test, data.y_test)[0]
    spec = tl.TrainSpec(steps="150it", batch_size=20, lr=3e-3, eval_every="50it")
    out = tl.train(model, data, spec)
    assert out["test_loss"] < 0.6 * before
    assert out["test_accuracy"] > 0.6  # chance is 1/3
    with pytest.raises(DataError, match="normalize needs floating inputs"):
        tl.from_tensors(data.x_train, data.y_train, data.x_test, data.y_test, normalize=True)


def test_in_proj_weight_pruned_stays_zero(tmp_path):
    data = token_data()
    torch.manual_seed(0)
    model = TokenNet()
    spec = tl.LotterySpec(
        steps="40it",
        batch_size=20,
        eval_every="20it",
        levels=1,
        prune_fraction=0.5,
        prunable=("attention", "linear"),
        runs_dir=str(tmp_path),
        quiet=True,
    )
    rows = tl.run_on_module(LotteryExperiment, model, data, spec)
    assert [r["level"] for r in rows] == [0, 1]
    (level1,) = tmp_path.glob("lottery-*/replicate-0/level-1/ticket")
    mask = tl.Mask.load(level1 / "mask.safetensors")
    name = "enc.self_attn.in_proj_weight"
    assert name in mask and 0.45 < mask.layer_density()[name] < 0.55
    w = read_state_file(level1 / "weights_end.safetensors")[0][name]  # compact or not
    assert bool((w[~mask[name]] == 0).all()) and bool((w[mask[name]] != 0).all())
    # the default selection is unchanged: attention weights are not prunable
    assert "enc.self_attn.in_proj_weight" not in tl.Mask.dense(TokenNet())


def test_controls_and_global_scope_on_selected_parameters(tmp_path):
    data = token_data()
    torch.manual_seed(0)
    spec = tl.LotterySpec(steps="20it", batch_size=20, eval_every="20it", levels=1,
                          scope="global", prunable=("attention", "embedding"),
                          controls=("reinit", "reshuffle", "signed-constant", "random-mask"),
                          runs_dir=str(tmp_path), quiet=True)  # fmt: skip
    rows = tl.run_on_module(LotteryExperiment, TokenNet(), data, spec)
    assert sorted(r["variant"] for r in rows if r["level"] == 1) == [
        "random-mask", "reinit", "reshuffle", "signed-constant", "ticket"
    ]  # fmt: skip
    level = next(tmp_path.glob("lottery-*/replicate-0/level-1"))
    ticket = read_state_file(level / "ticket" / "weights_start.safetensors")[0]
    reinit = read_state_file(level / "reinit" / "weights_start.safetensors")[0]
    mask = tl.Mask.load(level / "ticket" / "mask.safetensors")
    assert mask.names() == ["embed.weight", "enc.self_attn.in_proj_weight"]
    for name in mask.names():  # the reinit control re-draws the selected weights too
        kept = mask[name]
        assert bool((reinit[name][~kept] == 0).all())
        assert not torch.equal(reinit[name][kept], ticket[name][kept])


def test_attention_forward_mask_equals_in_place():
    torch.manual_seed(1)
    model = TokenNet()
    dense = tl.Mask.dense(model, include=["attention", "linear"], exclude=["head.*"])
    assert "head.weight" not in dense and "enc.self_attn.out_proj.weight" in dense
    g = torch.Generator().manual_seed(0)
    mask = tl.Mask({k: torch.rand(m.shape, generator=g) < 0.4 for k, m in dense.items()})
    zeroed = mask.apply_(copy.deepcopy(model))
    masked = copy.deepcopy(model)
    handle = attach(masked, mask, names=mask.names())
    x = torch.randint(0, 12, (5, 6))
    for training in (True, False):  # eval without grad takes the Transformer fast path
        zeroed.train(training)
        masked.train(training)
        with torch.no_grad():
            assert torch.allclose(zeroed(x), masked(x), atol=1e-5)
    w = masked.enc.self_attn.in_proj_weight
    assert bool((w != 0).all())  # the dense weights are kept behind the mask
    masked.train()
    masked(x).sum().backward()
    assert w.grad is not None and bool((w.grad[~mask["enc.self_attn.in_proj_weight"]] == 0).all())
    handle.detach()
    assert "forward" not in masked.enc.self_attn.__dict__


def test_criteria_on_selected_parameters_and_refusals():
    data = token_data()
    model = TokenNet()
    tl.masks.set_prunable(model, ["attention", "embedding"])
    mask = tl.Mask.dense(model)
    assert mask.names() == ["embed.weight", "enc.self_attn.in_proj_weight"]
    ctx = tl.pruning.Context(data=data, batch_size=20, generator=torch.Generator())
    for crit in ("snip", "taylor", "magnitude"):
        scores = tl.pruning.criteria.score(crit, model, mask, ctx)
        assert {k: tuple(v.shape) for k, v in scores.items()} == {
            k: tuple(m.shape) for k, m in mask.items()
        }
    for densities in ("layerwise", "erk"):
        tl.pruning.allocation.layer_densities(model, 0.5, densities)
    with pytest.raises(UsageError, match="synflow.*int64"):
        tl.pruning.criteria.score("synflow", model, mask, ctx)
    with pytest.raises(UsageError, match="in_proj_weight.*MultiheadAttention"):
        tl.pruning.criteria.score("variance", model, tl.Mask.dense(model, include=["attention"]))
    with pytest.raises(UsageError, match="matches no parameter"):
        tl.Mask.dense(model, include=["lstm"])


def l1(out, target):
    return (out - target).abs().mean()


def mae(out, target):
    return {"mae": (out - target).abs().mean(), "bias": (out - target).mean()}


def test_custom_loss_and_metric_drive_early_stopping(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(300, generator=g)
    data = tl.from_tensors(x[:250], y[:250, None], x[250:], y[250:, None], val_size=50,
                           targets="values")  # fmt: skip
    assert data.y_train.dtype == torch.float32 and data.num_classes == 0

    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))
    spec = tl.TrainSpec(steps="200it", batch_size=25, lr=1e-2, eval_every="10it", loss_fn=l1,
                        metrics_fn=mae, select="min:val_mae")  # fmt: skip
    assert spec.objective == "loss=test_custom.l1;metrics=test_custom.mae"
    out = tl.train(copy.deepcopy(model), data, spec, workdir=tmp_path / "a")
    rows = [json.loads(s) for s in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert out["best_val_step"] == min(rows, key=lambda r: r["val_mae"])["step"]
    assert out["test_mae"] < 0.5 * rows[0]["test_mae"] and "test_accuracy" not in out
    assert out["test_mae_at_best_val"] == next(
        r["test_mae"] for r in rows if r["step"] == out["best_val_step"]
    )
    # the reported training loss is the custom one: the mean L1 over the training set
    trained = tl.train(copy.deepcopy(model), data, spec)
    assert trained["train_loss"] == pytest.approx(trained["train_mae"], rel=1e-6)
    # patience: selecting the highest MAE (step 0, before training) stops two evaluations on
    stop = spec.replace(select="max:val_mae", patience=2)
    out = tl.train(copy.deepcopy(model), data, stop, workdir=tmp_path / "b")
    rows = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert out["best_val_step"] == 0 and out["steps"] == 20 and len(rows) == 3
    with pytest.raises(UsageError, match="no stable name"):
        tl.TrainSpec(loss_fn=lambda o, t: (o - t).pow(2).mean())
    named = tl.TrainSpec(loss_fn=lambda o, t: (o - t).pow(2).mean(), objective="mse")
    assert tl.spec.identity(named, 10)["objective"] == "mse"
    assert "objective" not in tl.spec.identity(tl.TrainSpec(), 10)
    with pytest.raises(UsageError, match="val_loss and val_accuracy only"):
        tl.TrainSpec(select="val_mae")


class PairNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.fc = nn.Linear(3 + 4, 2)

    def forward(self, features, token):
        return self.fc(torch.cat([features, self.embed(token)], 1))


def test_tuple_and_dict_inputs():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(200, 3, generator=g)
    token = torch.randint(0, 5, (200,), generator=g)
    y = (feats[:, 0] + 2 * (token >= 3).float() - 1 > 0).long()  # needs both inputs
    data = tl.from_tensors((feats[:160], token[:160]), y[:160], (feats[160:], token[160:]),
                           y[160:], val_size=20, normalize=True)  # fmt: skip
    assert data.x_train[1].dtype == torch.int64 and data.x_train[0].dtype == torch.float32
    assert data.input_shape == ((3,), ())
    torch.manual_seed(0)
    model = PairNet()
    spec = tl.TrainSpec(steps="200it", batch_size=20, lr=2e-2, eval_every="100it")
    first = tl.train(copy.deepcopy(model), data, spec)
    assert first["test_accuracy"] > 0.8
    ctx = tl.pruning.Context(data=data, batch_size=20, generator=torch.Generator())
    scores = tl.pruning.criteria.score("snip", model, tl.Mask.dense(model), ctx)
    assert scores["fc.weight"].shape == (2, 7) and float(scores["fc.weight"].sum()) > 0

    class DictNet(PairNet):
        def forward(self, *, features, token):
            return super().forward(features, token)

    as_dict = tl.from_tensors({"features": feats[:160], "token": token[:160]}, y[:160],
                              {"features": feats[160:], "token": token[160:]}, y[160:],
                              val_size=20, normalize=True)  # fmt: skip
    torch.manual_seed(0)
    second = tl.train(DictNet(), as_dict, spec)
    assert second["test_loss"] == first["test_loss"]  # the same data, the same training


# image folders -------------------------------------------------------------------------


def write_folder(root: Path, per_class=12, size=12):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", 3)):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                a = rng.integers(0, 80, (size, size)).astype(np.uint8)
                a[:, c * (size // 2) : (c + 1) * (size // 2)] += 150
                Image.fromarray(a).save(d / f"{i:03d}.png")
    return root


KILLED = """
import os, signal, sys, torch
sys.path.insert(0, {src!r})
import ticketlab as tl
from ticketlab.data import load
torch.set_num_threads(1)
data = load("imagefolder", {root!r}, val_size=4, workers=2)
model = tl.models.build("lenet_300_100", data.input_shape, 2, seed=0)
class Kill:
    def after_step(self, step, model, optimizer, keeper, x, y):
        if step == {kill}:
            os.kill(os.getpid(), signal.SIGKILL)
spec = tl.TrainSpec(**{spec!r})
tl.train(model, data, spec, workdir={work!r}, callbacks=[Kill()], aug_seed=5)
"""
SPEC = dict(steps="14it", batch_size=4, eval_every="7it", checkpoint_every="3it",
            checkpoint_seconds=0)  # fmt: skip


def folder_run(root, work):
    """Train LeNet on the folder with two workers, in this process on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = load("imagefolder", str(root), val_size=4, workers=2)
        model = tl.models.build("lenet_300_100", data.input_shape, 2, seed=0)
        tl.train(model, data, tl.TrainSpec(**SPEC), workdir=work, aug_seed=5)
    finally:
        torch.set_num_threads(threads)
    return model


def test_image_folder_workers_kill_resume_bit_identical(tmp_path):
    root = write_folder(tmp_path / "imgs")
    data = load("imagefolder", str(root), val_size=4, workers=2)
    assert data.n_train == 20 and data.input_shape == (1, 12, 12) and data.num_classes == 2
    whole = folder_run(root, tmp_path / "whole")
    # killed after step 7 of 14, in the second epoch's first half (5 steps an epoch), so
    # after the checkpoint at step 6
    script = KILLED.format(src=SRC, root=str(root), work=str(tmp_path / "cut"), kill=7, spec=SPEC)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cut = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert cut.returncode == -signal.SIGKILL, cut.stderr
    assert (tmp_path / "cut" / "checkpoint.safetensors").exists()
    resumed = folder_run(root, tmp_path / "cut")
    a, b = whole.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(s) for s in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 7, 14]
    # streamed runs record their throughput with each evaluation (benchmarks/streaming.py
    # reads it); its values are timings and are not asserted here
    assert all(key in rows[1] for key in THROUGHPUT_KEYS)


THROUGHPUT_KEYS = ("examples_per_second", "data_wait_seconds")


def test_streamed_batches_match_in_memory():
    """Without augmentation the streamed run sees the in-memory run's batches."""
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 6, generator=gen), torch.randint(0, 2, (40,), generator=gen)
    memory = tl.from_tensors(x[:32], y[:32], x[32:], y[32:])
    streamed = from_datasets(
        torch.utils.data.TensorDataset(x[:32], y[:32]),
        torch.utils.data.TensorDataset(x[32:], y[32:]),
        workers=2,
    )
    spec = tl.TrainSpec(steps="12it", batch_size=8, eval_every="6it", kernels="dense")
    nets = [tl.models.build("mlp_16", (6,), 2, seed=0) for _ in range(2)]
    a, b = tl.train(nets[0], memory, spec), tl.train(nets[1], streamed, spec)
    assert a["test_loss"] == b["test_loss"]
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))


def test_bad_image_named_or_skipped(tmp_path, capsys):
    root = write_folder(tmp_path / "imgs", per_class=6)
    bad = root / "train" / "c1" / "003.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    spec = tl.TrainSpec(steps="6it", batch_size=4, eval_every="3it")
    for workers in (0, 2):
        with pytest.raises(DataError) as err:
            data = load("imagefolder", str(root), val_size=0, workers=workers)
            tl.train(tl.models.build("lenet_300_100", (1, 12, 12), 2, seed=0), data, spec)
        msg = str(err.value)
        assert str(bad) in msg and "\n" not in msg
    data = load("imagefolder", str(root), val_size=0, workers=2, bad_files="skip")
    out = tl.train(tl.models.build("lenet_300_100", (1, 12, 12), 2, seed=0), data, spec)
    assert out["steps"] == 6 and str(bad) in capsys.readouterr().err


def test_cli_prunable_and_imagefolder(tmp_path):
    from ticketlab.cli import main

    root = write_folder(tmp_path / "imgs", per_class=6)
    common = ["--steps", "4it", "--batch-size", "4", "--runs-dir", str(tmp_path / "runs")]
    common += ["--quiet", "--levels", "1"]
    assert main(["lottery", "--dataset", "imagefolder", "--data-dir", str(root),
                 "--workers", "2", "--model", "lenet_300_100", *common]) == 0  # fmt: skip
    assert main(["lottery", "--dataset", "xor", "--model", "mlp_16", "--prunable",
                 "attention", *common]) == 2  # fmt: skip
    assert main(["lottery", "--dataset", "xor", "--model", "mlp_16", "--select",
                 "val_bleu", *common]) == 2  # fmt: skip
    assert main(["lottery", "--dataset", "imagefolder", *common]) == 2  # no --data-dir
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 1


def test_default_selection_hash_unchanged():
    base = tl.spec.identity(tl.LotterySpec(), 100)
    same = tl.spec.identity(tl.LotterySpec(prunable=("linear", "conv")), 100)
    assert base == same and "prunable" not in base
    other = tl.spec.identity(tl.LotterySpec(prunable=("linear", "attention")), 100)
    assert other["prunable"] == ["attention", "linear"]


def test_mse_regression_lottery(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x**2).sum(1, keepdim=True)
    data = tl.from_tensors(x[:160], y[:160], x[160:], y[160:], val_size=20, targets="values")
    spec = tl.LotterySpec(steps="60it", batch_size=20, eval_every="30it", levels=1,
                          loss_fn=F.mse_loss, runs_dir=str(tmp_path), quiet=True)  # fmt: skip
    model = nn.Sequential(nn.Linear(3, 32), nn.ReLU(), nn.Linear(32, 1))
    rows = tl.run_on_module(LotteryExperiment, model, data, spec)
    assert len(rows) == 2 and all(r["test_loss"] < rows[0]["test_loss"] * 3 for r in rows)
    assert "flops_speedup" in rows[1]
    stored = json.loads(next(tmp_path.glob("lottery-*/spec.json")).read_text())
    assert "loss_fn" not in json.dumps(stored) or "mse_loss" in json.dumps(stored)
    assert "torch.nn.functional.mse_loss" in json.dumps(stored)


def test_report_of_a_custom_objective_run_draws_its_metric(tmp_path):
    from ticketlab.report import build_report

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 3, generator=g)
    y = (x**2).sum(1, keepdim=True)
    data = tl.from_tensors(x[:160], y[:160], x[160:], y[160:], val_size=20, targets="values")

    def mae(out, target):
        return {"mae": (out - target).abs().mean()}

    spec = tl.LotterySpec(steps="40it", batch_size=20, eval_every="20it", levels=1,
                          loss_fn=F.mse_loss, metrics_fn=mae, select="val_mae", objective="mse+mae",
                          runs_dir=str(tmp_path / "runs"), quiet=True)  # fmt: skip
    model = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 1))
    rows = tl.run_on_module(LotteryExperiment, model, data, spec)
    (run,) = (tmp_path / "runs").iterdir()
    page = build_report([run], tmp_path / "report").read_text()
    assert "Test mae against density" in page and "Test accuracy against" not in page
    level1 = next(r for r in rows if r["level"] == 1)
    assert f"{level1['test_mae']:.4g}" in page  # the table shows the run's own values
