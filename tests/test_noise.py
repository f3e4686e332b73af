"""k-winners inside the model registry, and ``ticketlab noise`` end to end."""

import csv

import pytest
import torch
from torch import nn

import ticketlab.methods.lottery as lottery_mod
from ticketlab.cli import main
from ticketlab.data import from_tensors
from ticketlab.errors import UsageError
from ticketlab.kwinners import BoostDecay, KWinners, kwinners_factory
from ticketlab.models import build


@pytest.mark.parametrize(
    "name, shape", [("mlp_20_10", (1, 6, 6)), ("conv2", (1, 8, 8)), ("vgg11", (1, 8, 8))]
)
def test_activation_factory_keeps_names_and_weights(name, shape):
    plain = build(name, shape, 3, 0.25, seed=4)
    kw = build(name, shape, 3, 0.25, seed=4, activation=kwinners_factory(0.25, 1.5))
    assert dict(plain.named_parameters()).keys() == dict(kw.named_parameters()).keys()
    for (_, a), (_, b) in zip(plain.named_parameters(), kw.named_parameters()):
        assert torch.equal(a, b)
    layers = [m for m in kw.modules() if isinstance(m, KWinners)]
    assert layers and not any(isinstance(m, KWinners) for m in plain.modules())
    kw.eval()
    assert kw(torch.randn(2, *shape)).shape == (2, 3)
    for m in layers:
        assert m.k == max(1, round(0.25 * m.n)) and m.k_inference == min(m.n, round(1.5 * m.k))


def test_activation_gets_layer_output_shapes():
    seen = []

    def factory(shape):
        seen.append(shape)
        return nn.ReLU()

    build("conv2", (1, 8, 8), 3, 0.25, activation=factory)
    assert seen == [(16, 8, 8), (16, 8, 8), (64,), (64,)]
    with pytest.raises(UsageError):
        build("resnet20", (1, 8, 8), 3, 0.25, activation=factory)


def test_boost_decays_per_epoch():
    model = build("mlp_8", (4,), 2, activation=kwinners_factory(0.5, 1.0, beta=2.0))
    BoostDecay().on_epoch_end(1, model)
    (kw,) = [m for m in model.modules() if isinstance(m, KWinners)]
    assert kw.beta == pytest.approx(1.8)


@pytest.fixture
def tiny(monkeypatch):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(320, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long()
    data = from_tensors(x[:256], y[:256], x[256:], y[256:], val_size=32, name="tiny")
    monkeypatch.setattr(lottery_mod, "load_data", lambda *a, **k: data)
    return data


BASE = ["noise", "--model", "conv2", "--width", "0.25", "--batch-size", "32", "--quiet"]


def test_noise_command(tiny, tmp_path):
    args = [*BASE, "--steps", "2ep", "--eval-every", "1ep", "--density", "0.3"]
    assert main([*args, "--noise", "0,0.4,0.8", "--runs-dir", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("noise-*/results.csv")
    rows = list(csv.DictReader(path.open()))
    assert list(rows[0])[:5] == ["method", "replicate", "level", "variant", "noise"]
    got = {(r["variant"], float(r["noise"])) for r in rows}
    assert got == {(v, s) for v in ("dense", "sparse", "sparse-kwinners") for s in (0, 0.4, 0.8)}
    for r in rows:
        assert 0 <= float(r["test_accuracy"]) <= 1
        if float(r["noise"]) == 0:  # clean evaluation matches the training loop's own
            assert float(r["test_accuracy"]) == pytest.approx(float(r["clean_test_accuracy"]))
    dens = {r["variant"]: float(r["density"]) for r in rows}
    assert dens["dense"] == 1 and abs(dens["sparse"] - 0.3) < 0.02
    assert dens["sparse"] == dens["sparse-kwinners"]


def test_noise_bad_input(tiny, tmp_path):
    base = [*BASE, "--runs-dir", str(tmp_path)]
    assert main([*base, "--noise", "0,a"]) == 2
    assert main([*base, "--noise", "-0.1"]) == 2
    assert main([*base, "--density", "1"]) == 2
    assert main([*base, "--kwinners", "1.5"]) == 2
    assert main([*base, "--kwinners-inference", "0.5"]) == 2
    assert main([*base, "--model", "resnet20"]) == 2
    assert not list(tmp_path.iterdir())
