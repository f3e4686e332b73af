"""``ticketlab export`` and ``ticketlab.export``: compaction (dead units out, biases of
removed units folded forward), dense and CSR layers, the files and ``load_exported``,
the export check, bad input and ONNX.

The end-to-end tests export real tiny runs (LeNet, Conv-2, VGG-11 with BatchNorm and
ResNet-20, width 1/8) trained for a few steps on a Fashion-MNIST subset, and compare
the exported network with the masked original that ``load_model`` rebuilds.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import ticketlab as tl
import ticketlab.experiment as experiment_mod
from conftest import run_cli
from ticketlab import export as export_mod
from ticketlab.cli import main as cli_main
from ticketlab.data import from_tensors, load
from ticketlab.errors import DataError, UsageError
from ticketlab.export import compact, load_exported, save_exported
from ticketlab.models import build

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 28, 28)
COMMON = ["--dataset", "fashion_mnist", "--steps", "8it", "--batch-size", "32"]
COMMON += ["--eval-every", "8it", "--quiet"]
RUNS = {
    "lenet": ["lottery", "--model", "lenet_300_100", "--levels", "2", "--prune-fraction", "0.85"],
    "conv2": ["prune", "--model", "conv2", "--width", "0.125", "--sparsity", "0.9"],
    "vgg11": ["prune", "--model", "vgg11", "--width", "0.125", "--sparsity", "0.9"],
    "resnet20": ["prune", "--model", "resnet20", "--width", "0.125", "--sparsity", "0.9"],
}


@pytest.fixture(autouse=True)
def _seeded():
    """Random inputs and default inits are drawn from a fixed seed; the global RNG is
    restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def fmnist():
    d = load("fashion_mnist")
    return from_tensors(
        d.x_train[:512], d.y_train[:512], d.x_test[:256], d.y_test[:256],
        val_size=64, num_classes=10, name="fashion_mnist",
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fmnist):
    """One tiny run per model, trained on a Fashion-MNIST subset (the run's spec names
    fashion_mnist, so ``load_model`` and the export rebuild it as usual)."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(experiment_mod, "load_data", lambda *a, **k: fmnist)
        for key, args in RUNS.items():
            before = set(root.iterdir())
            assert cli_main([*args, *COMMON, "--runs-dir", str(root)]) == 0
            (out[key],) = set(root.iterdir()) - before
    return out


def _export(capsys, run, out, *flags):
    return run_cli(capsys, "export", run, "-o", out, "--batch-size", "8", *flags)


def _diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a(x) - b(x)).abs().max())


def _check_line(out: str) -> float:
    return float(re.search(r"check: max \|exported - original\| = (\S+)", out).group(1))


# end to end ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(RUNS))
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_exported_network_matches_the_masked_original(runs, fmnist, tmp_path, capsys, model, fmt):
    out = tmp_path / "export"
    rc, stdout, err = _export(capsys, runs[model], out, "--format", fmt)
    assert rc == 0, err
    assert _check_line(stdout) <= 1e-5
    assert "latency at batch 8" in stdout and "parameters:" in stdout
    net = load_exported(out)
    original = tl.load_model(runs[model])
    assert not net.training
    assert set(net.formats.values()) <= {fmt, "constant"}
    assert _diff(net, original, fmnist.x_test) <= 1e-5
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["input_shape"] == list(SHAPE) and manifest["output_shape"] == [10]
    assert manifest["check"]["max_abs_diff"] <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "weights.safetensors"]


def test_auto_format_times_both_and_records_them(runs, fmnist, tmp_path, capsys):
    out = tmp_path / "auto"
    rc, stdout, _ = _export(capsys, runs["lenet"], out)  # --format auto is the default
    assert rc == 0
    layers = json.loads((out / "manifest.json").read_text())["layers"]
    for info in layers.values():
        assert info["format"] in ("dense", "csr")
        assert info["dense_us"] > 0 and info["csr_us"] > 0
    assert _diff(load_exported(out), tl.load_model(runs["lenet"]), fmnist.x_test) <= 1e-5


def test_dead_units_are_removed_as_a_hand_count_says(runs, tmp_path, capsys):
    from safetensors.torch import load_file

    run = runs["lenet"]
    original = tl.load_model(run)  # the last level's ticket, masked
    w0, w1, w2 = (original.get_submodule(n).weight != 0 for n in ("hidden.0", "hidden.1", "fc"))
    # forward: fed by something alive; backward: feeds a kept unit (chain of three layers)
    fed0 = w0.any(1)
    fed1 = (w1 & fed0[None, :]).any(1)
    keep1 = fed1 & w2.any(0)
    keep0 = fed0 & (w1 & keep1[:, None]).any(0)
    inputs = (w0 & keep0[:, None]).any(0)
    assert keep0.sum() < 300 and inputs.sum() < 784  # some do go
    rc, _, _ = _export(capsys, run, tmp_path / "e", "--format", "dense")
    assert rc == 0
    t = load_file(str(tmp_path / "e" / "weights.safetensors"))
    n_in, n0, n1 = int(inputs.sum()), int(keep0.sum()), int(keep1.sum())
    assert tuple(t["hidden.0.weight"].shape) == (n0, n_in)
    assert tuple(t["hidden.1.weight"].shape) == (n1, n0)
    assert tuple(t["fc.weight"].shape) == (10, n1)
    assert torch.equal(t["input.index"], torch.nonzero(inputs).flatten())
    units = json.loads((tmp_path / "e" / "manifest.json").read_text())["units"]
    assert units["hidden.0"] == [n0, 300] and units["input"] == [n_in, 784]


def test_csr_and_dense_exports_load_back_and_agree(runs, fmnist, tmp_path, capsys):
    run = runs["conv2"]
    nets = {}
    for fmt in ("dense", "csr"):
        assert _export(capsys, run, tmp_path / fmt, "--format", fmt)[0] == 0
        nets[fmt] = load_exported(tmp_path / fmt)
    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "csr" / "weights.safetensors"))
    assert "hidden.0.weight.values" in stored and "hidden.0.weight" not in stored
    assert stored["hidden.0.weight.col_indices"].dtype == torch.int32
    x = fmnist.x_test
    assert _diff(nets["dense"], nets["csr"], x) <= 1e-5
    assert _diff(nets["csr"].as_format("dense"), nets["dense"], x) <= 1e-5
    assert _diff(nets["dense"], nets["dense"], x[:1]) == 0.0  # the batch-1 path too
    with torch.no_grad():
        one = torch.cat([nets["csr"](x[i : i + 1]) for i in range(4)])
        assert torch.allclose(one, nets["csr"](x[:4]), atol=1e-6)


def test_load_exported_round_trips_without_unpickling(tmp_path, monkeypatch):
    model = _random_masked(build("vgg11", SHAPE, 10, 0.125), 0.3)
    net = compact(model, SHAPE, format="csr")
    save_exported(net, tmp_path / "e")
    # nothing may be unpickled: make torch.load and pickle fail if anything tries
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    back = tl.load_exported(tmp_path / "e")
    x = torch.randn(16, *SHAPE)
    assert _diff(back, net, x) == 0.0
    assert back.manifest["architecture"] == net.manifest["architecture"]
    twin = copy.deepcopy(back)  # CSR layers keep plain buffers, so deepcopy works
    assert _diff(twin, back, x) == 0.0
    assert all(t.layout == torch.strided for t in back.state_dict().values())
    with pytest.raises(UsageError, match="expected inputs"):
        back(torch.randn(2, 3, 28, 28))


def test_a_corrupt_export_is_a_clear_error(tmp_path):
    net = compact(_random_masked(build("lenet_300_100", SHAPE, 10), 0.05), SHAPE, "csr")
    save_exported(net, tmp_path / "e")
    weights = tmp_path / "e" / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DataError, match="corrupt"):
        load_exported(tmp_path / "e")
    with pytest.raises(UsageError, match="not a ticketlab export"):
        load_exported(tmp_path)


# bad input -------------------------------------------------------------------------------


def _no_leftovers(out: Path) -> None:
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--level", "9"], "no level 9"),
        (["--variant", "nope"], "no variant 'nope'"),
        (["--replicate", "3"], "no replicate 3"),
        (["--format", "coo"], "invalid choice"),
    ],
)
def test_bad_requests_exit_2_and_write_nothing(runs, tmp_path, capsys, flags, message):
    out = tmp_path / "e"
    rc, _, err = _export(capsys, runs["lenet"], out, *flags)
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1
    _no_leftovers(out)


@pytest.mark.parametrize("which", ["weights_end.safetensors", "mask.safetensors", "spec.json"])
def test_corrupt_run_files_exit_2_and_write_nothing(runs, tmp_path, capsys, which):
    run = tmp_path / "run"
    shutil.copytree(runs["lenet"], run)
    path = run / which if which == "spec.json" else run / "replicate-0/level-2/ticket" / which
    path.write_bytes(path.read_bytes()[:50])
    out = tmp_path / "e"
    rc, _, err = _export(capsys, run, out)
    assert rc == 2 and "corrupt" in err and len(err.strip().splitlines()) == 1
    _no_leftovers(out)


def test_a_failed_check_exits_1_and_writes_nothing(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export_mod, "TOLERANCE", -1.0)  # no difference passes
    out = tmp_path / "e"
    rc, _, err = _export(capsys, runs["lenet"], out, "--format", "dense")
    assert rc == 1 and "export check failed" in err and "nothing written" in err
    _no_leftovers(out)


def test_an_existing_export_is_replaced_and_anything_else_refused(runs, tmp_path, capsys):
    out = tmp_path / "e"
    assert _export(capsys, runs["lenet"], out, "--format", "csr")[0] == 0
    assert _export(capsys, runs["lenet"], out, "--format", "dense")[0] == 0
    assert set(load_exported(out).formats.values()) == {"dense"}
    _no_leftovers(tmp_path / "other")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    rc, _, err = _export(capsys, runs["lenet"], other)
    assert rc == 2 and "not a ticketlab export" in err
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_onnx_without_the_package_is_a_one_line_error(runs, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    out = tmp_path / "e"
    rc, _, err = _export(capsys, runs["lenet"], out, "--onnx")
    assert rc == 2 and "pip install 'ticketlab[onnx]'" in err
    assert len(err.strip().splitlines()) == 1
    _no_leftovers(out)


def test_onnx_export(runs, fmnist, tmp_path, capsys):
    pytest.importorskip("onnx")
    out = tmp_path / "e"
    rc, stdout, err = _export(capsys, runs["resnet20"], out, "--onnx", "--format", "csr")
    assert rc == 0, err
    assert (out / "model.onnx").is_file() and "onnx: model.onnx" in stdout
    ort = importlib.util.find_spec("onnxruntime")
    info = json.loads((out / "manifest.json").read_text())["onnx"]
    assert (info["checked_with"] is not None) == (ort is not None)


# compaction rules, in memory -------------------------------------------------------------


def _random_masked(model: nn.Module, density: float, seed: int = 0) -> nn.Module:
    """``model`` with a random mask applied and BatchNorm statistics and biases made
    non-trivial (so folding and BN slicing are exercised), in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tl.prunable_weights(model).values():
            p.mul_((torch.rand(p.shape, generator=g) < density).float())
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1.0, 0.3, generator=g)
                m.bias.normal_(0.0, 0.5, generator=g)
            elif isinstance(m, nn.Linear):
                m.bias.normal_(0.0, 0.3, generator=g)
    return model.eval()


def test_biases_of_removed_units_are_folded_forward():
    model = build("mlp_8_8", (4,), 3).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in (model.hidden[0], model.hidden[1], model.fc):
            m.bias.normal_(0.0, 0.5, generator=g)
        model.hidden[0].weight[0] = 0  # unit 0: no inputs, outputs relu(bias) ...
        model.hidden[0].bias[0] = 0.7  # ... 0.7, which hidden.1 still reads
        model.hidden[1].weight[:, 1] = 0  # unit 1: nobody reads it
        model.hidden[0].weight[:, 2] = 0  # input feature 2: no weight reads it
        model.hidden[1].weight[3] = 0  # hidden.1 unit 3: a constant the output reads
    assert float(model.hidden[1].weight.detach()[:, 0].abs().sum()) > 0
    net = compact(model, (4,), format="dense")
    units = net.manifest["units"]
    assert units["hidden.0"] == [6, 8] and units["hidden.1"] == [7, 8] and units["input"] == [3, 4]
    x = torch.randn(64, 4, generator=g)
    assert _diff(net, model, x) <= 1e-5


def test_constant_channels_behind_a_padded_conv_become_an_offset_map():
    model = build("vgg11", SHAPE, 10, 0.125).eval()
    with torch.no_grad():
        bn = model.features[1]
        bn.bias[:2], bn.running_mean[:2] = 1.0, 0.0  # relu(BN(0)) = 1 for channels 0, 1
        model.features[0].weight[:2] = 0  # channels 0, 1: constant maps
    for fmt in ("dense", "csr"):
        net = compact(model, SHAPE, format=fmt)
        assert net.manifest["units"]["features.0"] == [6, 8]
        conv = next(s for s in net.manifest["architecture"] if s.get("name") == "features.4")
        assert conv["offset"]  # the padded border sees the constant differently: a map
        assert _diff(net, model, torch.randn(16, *SHAPE)) <= 1e-5


def test_resnet_stream_channels_go_only_when_dead_along_the_stage():
    model = _random_masked(build("resnet20", (3, 16, 16), 10, 0.25), 0.5)
    with torch.no_grad():
        # stage 1's stream: producers conv, blocks.0-2.conv2; consumers blocks.0-3.conv1,
        # blocks.3.shortcut.0. Channel 0: nothing writes it (a constant, folded forward).
        for name in ("conv", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"):
            model.get_submodule(name).weight[0] = 0
        # channel 1: nothing reads it
        for name in [f"blocks.{i}.conv1" for i in range(4)] + ["blocks.3.shortcut.0"]:
            model.get_submodule(name).weight[:, 1] = 0
        # channel 2: only blocks.1.conv2 stops writing it: it stays
        model.get_submodule("blocks.1.conv2").weight[2] = 0
    net = compact(model, (3, 16, 16), format="dense")
    assert net.manifest["units"]["conv"] == [2, 4]
    assert _diff(net, model, torch.randn(8, 3, 16, 16)) <= 1e-5


def test_every_registered_model_compacts_exactly():
    cases = [
        ("lenet_300_100", SHAPE, 1.0, 0.03),
        ("conv4", SHAPE, 0.125, 0.05),
        ("conv6", (3, 32, 32), 0.125, 0.1),
        ("vgg16", (3, 32, 32), 0.125, 0.1),
        ("resnet20", (3, 16, 16), 0.125, 0.05),
    ]
    for name, shape, width, density in cases:
        model = _random_masked(build(name, shape, 10, width), density)
        x = torch.randn(8, *shape)
        for fmt in ("dense", "csr"):
            assert _diff(compact(model, shape, format=fmt), model, x) <= 1e-5, (name, fmt)


def test_a_network_without_any_path_exports_its_constant_output():
    model = build("mlp_8", (4,), 3).eval()
    with torch.no_grad():
        model.hidden[0].weight.zero_()
        model.hidden[0].bias.fill_(0.5)
        model.fc.bias.normal_(generator=torch.Generator().manual_seed(0))
    net = compact(model, (4,), format="csr")
    assert [s["op"] for s in net.manifest["architecture"]] == ["constant", "batch_first"]
    x = torch.randn(5, 4)
    assert _diff(net, model, x) <= 1e-5


def test_what_cannot_be_compacted_is_refused():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(x) * 2

    with pytest.raises(UsageError, match="cannot compact a Custom"):
        compact(Custom(), (4,))
    from ticketlab.models.kwinners import kwinners_factory

    kw = build("mlp_8", (4,), 3, activation=kwinners_factory(0.5))
    with pytest.raises(UsageError, match="custom activations"):
        compact(kw, (4,))
    seq = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    with pytest.raises(UsageError, match="LayerNorm"):
        compact(seq, (4,))
    with pytest.raises(UsageError, match="unknown format"):
        compact(build("mlp_8", (4,), 3), (4,), format="coo")


def test_sequential_stacks_compact_too():
    seq = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 14 * 14, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3),
    )  # fmt: skip
    seq = _random_masked(seq, 0.2)
    for fmt in ("dense", "csr"):
        assert _diff(compact(seq, SHAPE, format=fmt), seq, torch.randn(4, *SHAPE)) <= 1e-5


# the benchmark script --------------------------------------------------------------------


def test_inference_benchmark_runs_and_checks_outputs(capsys):
    spec = importlib.util.spec_from_file_location("inference", ROOT / "benchmarks/inference.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "all outputs equal to 1e-05" in out
    assert re.search(r"lenet_300_100 98%", out) and re.search(r"conv4 98%", out)
