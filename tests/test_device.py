"""``--device``: where a run trains, not what it is. On the CPU it gives the run of the
default, in the same directory; a device that is not there, or a spelling that is not a
device, is refused in one line before anything is written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import one_error_line
from conftest import run_cli as cli
from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.models import build
from ticketlab.runs import load_state
from ticketlab.spec import Spec, identity, resolve_device, spec_hash

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
)
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")

TINY = ["--dataset", "fashion_mnist", "--model", "lenet_300_100", "--steps", "20it"]
TINY += ["--eval-every", "10it", "--levels", "1", "--quiet"]
XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50", "--steps", "20it"]
XOR += ["--eval-every", "10it", "--levels", "1", "--quiet"]


def only_run(runs: Path) -> Path:
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def results(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.pop("train_seconds")  # the clock, not the run
    return rows


@needs_fashion
def test_device_cpu_is_the_default_run(capsys, tmp_path):
    default, cpu = tmp_path / "default", tmp_path / "cpu"
    assert cli(capsys, "lottery", *TINY, "--runs-dir", default)[0] == 0
    assert cli(capsys, "lottery", *TINY, "--device", "cpu", "--runs-dir", cpu)[0] == 0
    a, b = only_run(default), only_run(cpu)
    assert a.name == b.name  # the same hash
    assert results(a) == results(b)
    for level in ("level-0", "level-1"):
        end = f"replicate-0/{level}/ticket/weights_end.safetensors"
        wa, wb = load_state(a / end), load_state(b / end)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert Mask.load(a / f"replicate-0/{level}/ticket/mask.safetensors") == Mask.load(
            b / f"replicate-0/{level}/ticket/mask.safetensors"
        )
    # the default's directory is the run of --device cpu: given again, it is reused
    rc, _, _ = cli(capsys, "lottery", *TINY, "--device", "cpu", "--runs-dir", default)
    assert rc == 0
    assert only_run(default) == a


@no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_device_that_is_not_there_exits_2_and_writes_nothing(capsys, tmp_path, device):
    runs = tmp_path / "runs"
    rc, out, err = cli(capsys, "lottery", *XOR, "--device", device, "--runs-dir", runs)
    assert rc == 2
    line = one_error_line(err)
    assert device in line and "no CUDA device" in line
    assert "available: cpu" in line  # what there is
    assert out == ""
    assert not runs.exists()


@pytest.mark.parametrize("device", ["bogus", "gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_an_unknown_device_exits_2_listing_the_valid_forms(capsys, tmp_path, device):
    runs = tmp_path / "runs"
    rc, out, err = cli(capsys, "lottery", *XOR, "--device", device, "--runs-dir", runs)
    assert rc == 2
    line = one_error_line(err)
    assert repr(device) in line
    assert "auto, cpu, cuda, cuda:N" in line
    assert out == ""
    assert not runs.exists()


def test_the_device_is_recorded_in_spec_json_but_not_hashed(capsys, tmp_path):
    runs = tmp_path / "runs"
    assert cli(capsys, "lottery", *XOR, "--device", "cpu", "--runs-dir", runs)[0] == 0
    stored = json.loads((only_run(runs) / "spec.json").read_text())
    assert stored["spec"]["device"] == "cpu"
    assert "device" not in stored["identity"]
    base = Spec(dataset="xor", model="mlp_16")
    for device in ("cpu", "cuda", "cuda:1"):
        moved = base.replace(device=device)
        assert spec_hash(identity(moved, 10)) == spec_hash(identity(base, 10))


def test_a_spec_naming_a_gpu_is_read_anywhere_and_refused_only_where_it_runs():
    spec = Spec(device="cuda:1")  # a stored GPU run's spec: building it checks the form only
    assert spec.device == "cuda:1"
    with pytest.raises(UsageError, match="choose from: auto, cpu, cuda, cuda:N"):
        Spec(device="gpu")
    assert resolve_device("cpu") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device("auto", jobs=2) == torch.device("cpu")  # forked workers: the CPU
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="available: cpu"):
            resolve_device("cuda")


def test_masks_follow_their_model_and_move_on_request():
    model = build("mlp_16", (2,), 2, 1.0, "kaiming_normal", 0)
    mask = Mask.dense(model)
    assert mask.device == torch.device("cpu")
    assert mask.to("cpu") is mask  # nothing to move
    g = torch.Generator().manual_seed(0)
    sparse = Mask({n: torch.rand(m.shape, generator=g) < 0.5 for n, m in mask.items()})
    assert sparse.to(torch.device("cpu")) == sparse
    assert Mask({}).device == torch.device("cpu")
