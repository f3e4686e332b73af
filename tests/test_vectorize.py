"""Vectorised training (--vectorize): K copies as one stack equal K sequential trainings
within float tolerance, each with its own mask, data order and optimizer state; what
cannot be stacked (BatchNorm) trains one at a time, said and identical."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from conftest import run_cli
from ticketlab.data import from_tensors
from ticketlab.masks import Mask
from ticketlab.models import build
from ticketlab.runs import read_csv
from ticketlab.spec import Spec
from ticketlab.train import request_stop, train
from ticketlab.vectorized import Copy, train_stacked, why_not_vectorized


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, :, :4].mean((1, 2)) > 0).long()
    return from_tensors(x[:320], y[:320], x[320:], y[320:], val_size=40, name="quad")


class LayerNormNet(nn.Module):
    """A layer that is neither Linear nor Conv2d: the stack falls back to vmap."""

    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.norm(self.fc1(x.flatten(1)))))


def _models(kind: str, K: int, data):
    if kind == "layernorm":
        out = []
        for s in range(K):
            torch.manual_seed(s)
            out.append(LayerNormNet())
        return out
    return [
        build(kind, data.input_shape, data.num_classes, 1.0, "kaiming_normal", s) for s in range(K)
    ]


def _masks(models, density: float):
    """Copy 0 dense (no mask), the others each their own random mask."""
    masks = [None]
    for k, m in enumerate(models[1:], 1):
        g = torch.Generator().manual_seed(100 + k)
        masks.append(
            Mask({n: torch.rand(d.shape, generator=g) < density for n, d in Mask.dense(m).items()})
        )
    return masks


@pytest.mark.parametrize(
    "kind, optimizer",
    [("mlp_32_16", "sgd"), ("mlp_32_16", "adam"), ("conv2", "adam"), ("layernorm", "sgd")],
)
def test_stacked_training_equals_sequential(kind, optimizer):
    data = _data()
    spec = Spec(
        steps="40it",
        eval_every="20it",
        batch_size=16,
        optimizer=optimizer,
        lr=0.05 if optimizer == "sgd" else 2e-3,
        momentum=0.9 if optimizer == "sgd" else 0.0,
        weight_decay=1e-3,
        kernels="dense",
    )
    models = _models(kind, 3, data)
    masks = _masks(models, 0.3)
    seq = [copy.deepcopy(m) for m in models]
    vec = [copy.deepcopy(m) for m in models]
    want = [
        train(m, data, spec, mk, data_seed=10 + k, aug_seed=20 + k)
        for k, (m, mk) in enumerate(zip(seq, masks))
    ]
    got = train_stacked(
        [Copy(m, mk, 10 + k, 20 + k) for k, (m, mk) in enumerate(zip(vec, masks))], data, spec
    )
    for k in range(3):
        for (name, p), q in zip(seq[k].named_parameters(), vec[k].parameters()):
            torch.testing.assert_close(q, p, atol=2e-5, rtol=1e-4, msg=f"copy {k} {name}")
        if masks[k] is not None:  # each copy's own mask, pruned weights exactly zero
            for name, m in masks[k].items():
                w = dict(vec[k].named_parameters())[name]
                assert torch.count_nonzero(w[~m]) == 0
        for key in ("test_loss", "val_loss", "train_loss"):
            assert got[k][key] == pytest.approx(want[k][key], rel=1e-4, abs=1e-5)
        assert got[k]["vectorized"] == 3 and got[k]["best_val_step"] == want[k]["best_val_step"]
    # the copies are distinct runs (own seeds and masks), not one run three times
    assert not torch.equal(next(vec[0].parameters()), next(vec[1].parameters()))


def test_interrupted_stack_resumes_to_the_uninterrupted_result(tmp_path):
    data = _data()
    spec = Spec(steps="30it", eval_every="10it", batch_size=16, checkpoint_every="10it")
    models = _models("mlp_32_16", 2, data)
    masks = _masks(models, 0.5)

    def copies(ms, root, stop_at=None):
        def stop(step, model):
            request_stop()

        at = {stop_at} if stop_at else set()
        return [
            Copy(m, mk, 10 + k, 20 + k, root / f"c{k}", snapshot_steps=at, on_snapshot=stop)
            for k, (m, mk) in enumerate(zip(ms, masks))
        ]

    whole = [copy.deepcopy(m) for m in models]
    train_stacked(copies(whole, tmp_path / "whole"), data, spec)
    parts = [copy.deepcopy(m) for m in models]
    from ticketlab.errors import RunInterrupted

    with pytest.raises(RunInterrupted):
        train_stacked(copies(parts, tmp_path / "parts", stop_at=17), data, spec)
    assert (tmp_path / "parts" / "c1" / "checkpoint.safetensors").exists()
    fresh = [copy.deepcopy(m) for m in models]  # a new process: weights from the checkpoint
    train_stacked(copies(fresh, tmp_path / "parts"), data, spec)
    for a, b in zip(whole, fresh):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)
    lines = (tmp_path / "parts" / "c1" / "metrics.jsonl").read_text().splitlines()
    assert [int(line.split('"step": ')[1].split(",")[0]) for line in lines] == [0, 10, 20, 30]


def test_what_cannot_be_stacked_is_named():
    bn = build("conv2", (1, 8, 8), 4, 1.0, "kaiming_normal", 0)
    bn.extra = nn.BatchNorm1d(4)
    assert "BatchNorm" in why_not_vectorized([bn, copy.deepcopy(bn)])
    drop = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Dropout(0.5), nn.Linear(8, 4))
    assert "dropout" in why_not_vectorized([drop, copy.deepcopy(drop)])
    a, b = nn.Linear(4, 2), nn.Linear(4, 3)
    assert "architecture" in why_not_vectorized([a, b])
    assert why_not_vectorized([a, copy.deepcopy(a)]) is None


ARGS = ["lottery", "--dataset", "xor", "--model", "mlp_16", "--batch-size", "16"]
ARGS += ["--steps", "30it", "--eval-every", "10it", "--levels", "2", "--controls", "reinit"]
ARGS += ["--kernels", "dense", "--quiet"]


def test_lottery_vectorize_writes_the_sequential_run(tmp_path, capsys):
    for name, extra in (("seq", []), ("vec", ["--vectorize"])):
        args = [*ARGS, "--replicates", "2", "--runs-dir", tmp_path / name, *extra]
        rc, _, err = run_cli(capsys, *args)
        assert rc == 0, err
    (seq,) = (tmp_path / "seq").iterdir()
    (vec,) = (tmp_path / "vec").iterdir()
    assert seq.name == vec.name  # not part of the run's identity
    a, b = read_csv(seq / "results.csv"), read_csv(vec / "results.csv")
    key = [(r["replicate"], r["level"], r["variant"]) for r in a]
    assert key == [(r["replicate"], r["level"], r["variant"]) for r in b] and len(key) == 10
    for x, y in zip(a, b):
        assert float(y["density"]) == pytest.approx(float(x["density"]))
        assert float(y["test_loss"]) == pytest.approx(float(x["test_loss"]), rel=1e-3, abs=1e-4)
    assert {r["vectorized"] for r in b} == {"2"}  # tickets of 2 replicates, then 2 controls
    # a second run has nothing left to do and changes nothing
    before = (vec / "results.csv").read_text()
    rc, _, err = run_cli(capsys, *ARGS, "--replicates", "2", "--runs-dir", tmp_path / "vec",
                         "--vectorize")  # fmt: skip
    assert rc == 0, err
    assert (vec / "results.csv").read_text() == before


def test_batchnorm_falls_back_and_says_so(tmp_path, capsys, tiny_images):
    args = ["lottery", "--model", "vgg11", "--width", "0.125", "--batch-size", "32"]
    args += ["--steps", "8it", "--eval-every", "4it", "--levels", "1", "--quiet"]
    for name, extra in (("seq", []), ("vec", ["--vectorize"])):
        rc, _, err = run_cli(capsys, *args, "--replicates", "2", "--runs-dir", tmp_path / name,
                             *extra)  # fmt: skip
        assert rc == 0, err
        if extra:
            assert "BatchNorm" in err and "one at a time" in err
    (seq,) = (tmp_path / "seq").iterdir()
    (vec,) = (tmp_path / "vec").iterdir()
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_seconds"} for r in rows]  # noqa: E731
    assert strip(read_csv(seq / "results.csv")) == strip(read_csv(vec / "results.csv"))


@pytest.mark.parametrize(
    "extra, message",
    [(["--jobs", "2"], "alternatives"), ([], "not available for prune")],
)
def test_vectorize_refusals(tmp_path, capsys, extra, message):
    if extra:
        args = [*ARGS, "--vectorize", *extra, "--runs-dir", tmp_path]
    else:
        args = ["prune", "--dataset", "xor", "--model", "mlp_16", "--steps", "10it"]
        args += ["--sparsity", "0.5", "--set", "vectorize=true", "--runs-dir", tmp_path]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 2 and message in err and not list(tmp_path.iterdir())
