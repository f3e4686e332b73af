"""BatchNorm-only training: only BN scale and shift (and the output layer) change."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.errors import UsageError
from ticketlab.methods.bn_only import BnOnlyExperiment, BnOnlySpec, trainable_names


def images(n=384, seed=0):
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = torch.randn(n, 1, 8, 8, generator=gen) * 0.5
    x[:, 0, 0, :] += y[:, None].float()  # the class is in the first row
    return x, y


def data():
    x, y = images()
    xt, yt = images(128, 1)
    return tl.data.from_tensors(x, y, xt, yt, val_size=64, name="rows")


@pytest.mark.parametrize("train_output", [False, True])
def test_only_allowed_parameters_change(tmp_path, train_output):
    spec = BnOnlySpec(
        model="resnet20",
        width=0.25,
        steps="30it",
        eval_every="30it",
        batch_size=32,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=1e-3,
        train_output=train_output,
        runs_dir=str(tmp_path),
        quiet=True,
    )
    exp = BnOnlyExperiment(spec, data=data())
    rows = exp.run()
    assert [r["variant"] for r in rows] == ["bn-only", "random-params"]
    assert rows[0]["trainable"] == rows[1]["trainable"]
    model = exp.model_fn(0)
    allowed = set(trainable_names(model, train_output))
    params = {n for n, _ in model.named_parameters()}
    base = exp.dir / "replicate-0" / "level-0"
    start = load_file(str(base / "bn-only" / "weights_start.safetensors"))
    end = load_file(str(base / "bn-only" / "weights_end.safetensors"))
    changed = {k for k in params if not torch.equal(start[k], end[k])}
    assert changed and changed <= allowed
    assert any(".fc." in k or k.startswith("fc.") for k in changed) == train_output
    start = load_file(str(base / "random-params" / "weights_start.safetensors"))
    end = load_file(str(base / "random-params" / "weights_end.safetensors"))
    moved = sum(int((start[k] != end[k]).sum()) for k in params)
    assert 0 < moved <= rows[1]["trainable"]  # weight decay and momentum moved no others
    assert 0.0 <= rows[0]["small_gamma_fraction"] <= 1.0


def test_bn_only_needs_batchnorm(tmp_path):
    with pytest.raises(UsageError):
        BnOnlyExperiment(
            BnOnlySpec(model="mlp_8", steps="5it", runs_dir=str(tmp_path)), data=data()
        )
    args = ["bn-only", "--dataset", "xor", "--model", "mlp_8", "--steps", "5it"]
    assert main(args + ["--runs-dir", str(tmp_path / "bad"), "--quiet"]) == 2
    assert not (tmp_path / "bad").exists()
