"""Adapting a trained network to new tasks: FiLM trains only scales and shifts, fine-tuning
trains everything, SupSup trains a mask; bad input writes nothing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.errors import UsageError
from ticketlab.methods.adapt import AdaptExperiment, AdaptSpec, add_film, film_parameters
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.models import build
from ticketlab.runs import read_csv


def easy(n, seed):
    """Class c lights up features 4c..4c+3 of 16."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 16, generator=gen)
    x += 3.0 * torch.nn.functional.one_hot(y, 4).repeat_interleave(4, dim=1)
    return x, y


def easy_data():
    x, y = easy(1000, 0)
    xt, yt = easy(256, 1)
    return tl.data.from_tensors(x, y, xt, yt, val_size=100, name="easy")


TRAINING = dict(eval_every="40it", optimizer="adam", lr=0.01, batch_size=50, quiet=True)


def trained_run(tmp_path, data):
    spec = tl.TrainSpec(
        method="train", model="mlp_32", steps="40it", runs_dir=str(tmp_path / "src"), **TRAINING
    )
    exp = LotteryExperiment(spec, data=data)
    exp.run()
    return exp.dir


@pytest.mark.parametrize("train_output", [False, True])
def test_film_trains_only_scales_and_shifts(tmp_path, train_output):
    data = easy_data()
    source = trained_run(tmp_path, data)
    spec = AdaptSpec(
        model="mlp_32", weights=str(source), steps="40it", train_output=train_output,
        runs_dir=str(tmp_path / "runs"), **TRAINING,
    )  # fmt: skip
    exp = AdaptExperiment(spec, data=data)
    rows = exp.run()
    assert [r["variant"] for r in rows] == ["film", "finetune", "supsup"]
    film, finetune, supsup = rows
    trained = load_file(
        str(source / "replicate-0" / "level-0" / "dense" / "weights_end.safetensors")
    )
    base = exp.dir / "replicate-0" / "level-0"
    start = load_file(str(base / "film" / "weights_start.safetensors"))
    end = load_file(str(base / "film" / "weights_end.safetensors"))
    allowed = {"hidden.0.film.scale", "hidden.0.film.shift"}
    allowed |= {"fc.weight", "fc.bias"} if train_output else set()
    assert set(start) == set(trained) | {"hidden.0.film.scale", "hidden.0.film.shift"}
    assert all(torch.equal(start[k], trained[k]) for k in trained)  # starts as trained
    changed = {k for k in start if not torch.equal(start[k], end[k])}
    assert changed == allowed  # every other weight is bit-identical
    assert film["trained_params"] == 64 + (32 * 4 + 4 if train_output else 0)
    start = load_file(str(base / "finetune" / "weights_start.safetensors"))
    end = load_file(str(base / "finetune" / "weights_end.safetensors"))
    assert {k for k in start if not torch.equal(start[k], end[k])} == set(trained)
    assert finetune["trained_params"] == sum(v.numel() for v in trained.values())
    assert supsup["trained_params"] == 16 * 32 + 32 * 4 and supsup["density"] == pytest.approx(0.5)
    assert finetune["test_accuracy"] > 0.6  # chance is 0.25
    csv = read_csv(exp.dir / "results.csv")
    assert {"task", "task_kind", "trained_params"} <= set(csv[0])
    if not train_output:  # asking for another task extends the same run
        more = AdaptExperiment(spec.replace(tasks=2, variants=("film",)), data=data)
        assert more.dir == exp.dir
        rows2 = more.run()
        assert rows2[:3] == rows and [r["level"] for r in rows2[3:]] == [1]


def test_film_on_batchnorm_trains_only_bn_scales_and_shifts(tmp_path):
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=gen)
    x = 0.5 * torch.randn(300, 1, 8, 8, generator=gen)
    x[:, 0, 0, :] += y[:, None].float()  # the class is in the first row
    data = tl.data.from_tensors(x[:200], y[:200], x[200:], y[200:], val_size=50, name="rows")
    kw = dict(model="resnet20", width=0.25, steps="10it", eval_every="10it", batch_size=32,
              optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-3, quiet=True)  # fmt: skip
    source = LotteryExperiment(
        tl.TrainSpec(method="train", runs_dir=str(tmp_path / "src"), **kw), data=data
    )
    source.run()
    spec = AdaptSpec(weights=str(source.dir), variants=("film",), runs_dir=str(tmp_path), **kw)
    exp = AdaptExperiment(spec, data=data)
    (row,) = exp.run()
    vdir = exp.dir / "replicate-0" / "level-0" / "film"
    start = load_file(str(vdir / "weights_start.safetensors"))
    end = load_file(str(vdir / "weights_end.safetensors"))
    model = exp.model_fn(0)
    params = {n for n, _ in model.named_parameters()}
    allowed = set(film_parameters(model))
    assert set(start) == set(model.state_dict())  # no FiLM layers: BN is there
    changed = {k for k in params if not torch.equal(start[k], end[k])}
    assert changed and changed <= allowed
    assert row["trained_params"] == sum(start[k].numel() for k in allowed)


def test_film_layers_and_batchnorm():
    mlp = build("mlp_8_8", (5,), 3)
    x = torch.randn(4, 5)
    before = mlp(x)
    names = add_film(mlp)
    assert names == [
        "hidden.0.film.scale", "hidden.0.film.shift", "hidden.1.film.scale", "hidden.1.film.shift",
    ]  # fmt: skip
    assert torch.equal(mlp(x), before)  # identity at the start
    mlp.hidden[0].film.shift.data.fill_(100.0)
    assert not torch.equal(mlp(x), before)
    conv = build("conv2", (1, 8, 8), 3, width=0.125)
    y = torch.randn(2, 1, 8, 8)
    out = conv(y)
    assert len(add_film(conv)) == 2 * 4  # two conv and two hidden fc layers
    assert torch.equal(conv(y), out)
    resnet = build("resnet20", (3, 8, 8), 3, width=0.25)
    names = film_parameters(resnet)
    assert names and all(k.rsplit(".", 1)[1] in ("weight", "bias") for k in names)
    assert not any("film" in n for n, _ in resnet.named_parameters())  # BN scales, no FiLM


def test_adapt_command_line(tmp_path):
    common = ["--dataset", "xor", "--model", "mlp_8", "--quiet", "--runs-dir", str(tmp_path)]
    steps = ["--steps", "20it", "--eval-every", "20it", "--batch-size", "50"]
    assert main(["train", *common, *steps]) == 0
    (source,) = tmp_path.glob("train-*")
    args = ["adapt", *common, *steps, "--weights", str(source), "--task-kind", "split"]
    assert main(args) == 0
    (run,) = tmp_path.glob("adapt-*")
    rows = read_csv(run / "results.csv")
    assert sorted(r["variant"] for r in rows) == ["film", "finetune", "supsup"]
    assert all(int(r["trained_params"]) > 0 and r["task_kind"] == "split" for r in rows)


def test_bad_input_writes_nothing(tmp_path, capsys):
    common = ["adapt", "--dataset", "xor", "--model", "mlp_8", "--steps", "5it", "--quiet"]
    bad = tmp_path / "bad"
    for extra in (
        ["--weights", str(tmp_path / "missing")],
        [],  # no --weights
        ["--weights", str(tmp_path), "--task-kind", "rotated"],
        ["--weights", str(tmp_path), "--variants", "film,distill"],
    ):
        capsys.readouterr()
        assert main(common + extra + ["--runs-dir", str(bad)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("ticketlab: error:")
    # a trained run whose weights do not fit the model
    src = tmp_path / "src"
    steps = ["--steps", "5it", "--eval-every", "5it", "--batch-size", "50"]
    assert (
        main(
            [
                "train",
                "--dataset",
                "xor",
                "--model",
                "mlp_4",
                "--quiet",
                "--runs-dir",
                str(src),
                *steps,
            ]
        )
        == 0
    )
    (source,) = src.glob("train-*")
    assert main(common + ["--weights", str(source), "--runs-dir", str(bad)]) == 2
    assert "mlp_4" in capsys.readouterr().err
    assert not bad.exists()
    with pytest.raises(UsageError):
        AdaptSpec(tasks=0)
