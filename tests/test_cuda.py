"""The training loop on a CUDA device: data and masks on the device, pruned weights
exactly zero, and a checkpoint written on the GPU that resumes on the CPU to the same
weights. Skipped where there is no CUDA device."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from ticketlab.data import load
from ticketlab.masks import Mask
from ticketlab.models import build
from ticketlab.spec import Spec
from ticketlab.train import request_stop, train

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device on this machine"
)


def _setup():
    data = load("xor", val_size=64, split_seed=0)
    model = build("mlp_32_16", data.input_shape, data.num_classes, 1.0, "kaiming_normal", 0)
    g = torch.Generator().manual_seed(1)
    mask = Mask({n: torch.rand(m.shape, generator=g) < 0.3 for n, m in Mask.dense(model).items()})
    return data, model, mask


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_masked_training_on_cuda_keeps_pruned_weights_zero(amp):
    data, model, mask = _setup()
    spec = Spec(steps="60it", eval_every="30it", batch_size=32, weight_decay=1e-3, amp=amp)
    gpu = copy.deepcopy(model).cuda()
    out = train(gpu, data, spec, mask)
    named = dict(gpu.named_parameters())
    for name, m in mask.items():
        assert named[name].is_cuda and torch.count_nonzero(named[name][~m.cuda()]) == 0
    cpu = copy.deepcopy(model)
    ref = train(cpu, data, Spec(**{**spec.__dict__, "amp": "none"}), mask)
    tol = 1e-3 if amp == "none" else 0.1
    assert out["test_loss"] == pytest.approx(ref["test_loss"], rel=tol)


def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    data, model, mask = _setup()
    spec = Spec(steps="40it", eval_every="10it", batch_size=32, checkpoint_every="10it")

    def stop(step, m):
        request_stop()

    from ticketlab.errors import RunInterrupted

    gpu = copy.deepcopy(model).cuda()
    with pytest.raises(RunInterrupted):
        train(gpu, data, spec, mask, workdir=tmp_path, snapshot_steps={20}, on_snapshot=stop)
    cpu = copy.deepcopy(model)
    train(cpu, data, spec, mask, workdir=tmp_path)  # resumes at step 20, on the CPU
    whole = copy.deepcopy(model)
    train(whole, data, spec, mask)
    for p, q in zip(whole.parameters(), cpu.parameters()):
        torch.testing.assert_close(q, p, atol=1e-4, rtol=1e-3)


FASHION = "/usr/share/datasets/fashion-mnist"
LOTTERY = ["--dataset", "fashion_mnist", "--model", "lenet_300_100", "--steps", "40it"]
LOTTERY += ["--eval-every", "10it", "--checkpoint-every", "10it", "--levels", "1"]
LOTTERY += ["--controls", "reinit,random-mask", "--quiet"]


def _lottery(runs, device: str) -> int:
    from ticketlab.cli import main

    return main(["lottery", *LOTTERY, "--device", device, "--runs-dir", str(runs)])


def _only_run(runs):
    dirs = [p for p in runs.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not installed")
def test_a_lottery_interrupted_on_cuda_resumes_and_finishes_on_the_cpu(tmp_path, monkeypatch):
    import ticketlab.experiment as experiment_mod
    from ticketlab.runs import read_csv

    real = experiment_mod.train
    fired = []

    class Stop:  # interrupts the level-1 ticket once, after a checkpoint on the GPU
        def __init__(self, label):
            self.label = label

        def after_step(self, step, model, *args):
            if "level 1 ticket" in self.label and step == 20 and not fired:
                fired.append(next(model.parameters()).device.type)
                request_stop()

    def train(*args, callbacks=(), label="", **kw):
        return real(*args, callbacks=[*callbacks, Stop(label)], label=label, **kw)

    monkeypatch.setattr(experiment_mod, "train", train)
    runs = tmp_path / "runs"
    assert _lottery(runs, "cuda") == 130
    assert fired == ["cuda"]
    run = _only_run(runs)
    ticket = run / "replicate-0" / "level-1" / "ticket"
    assert (ticket / "checkpoint.safetensors").exists()
    assert not (ticket / "result.json").exists()
    monkeypatch.setattr(experiment_mod, "train", real)
    assert _lottery(runs, "cpu") == 0  # the same run (same hash), resumed on the CPU
    assert _only_run(runs) == run
    rows = read_csv(run / "results.csv")
    got = sorted((int(r["level"]), r["variant"], r["status"]) for r in rows)
    assert got == [
        (0, "ticket", "done"),
        (1, "random-mask", "done"),
        (1, "reinit", "done"),
        (1, "ticket", "done"),
    ]
    steps = [
        json.loads(line)["step"] for line in (ticket / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [0, 10, 20, 30, 40]  # continued from step 20, not started again
    assert json.loads((run / "spec.json").read_text())["spec"]["device"] == "cpu"


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not installed")
def test_a_lottery_on_cuda_keeps_pruned_weights_exactly_zero(tmp_path):
    from ticketlab.runs import load_state

    runs = tmp_path / "runs"
    assert _lottery(runs, "cuda") == 0
    level = _only_run(runs) / "replicate-0" / "level-1"
    for variant in ("ticket", "reinit", "random-mask"):
        mask = Mask.load(level / variant / "mask.safetensors")
        assert mask.density() < 1.0
        weights = load_state(level / variant / "weights_end.safetensors")
        for name, m in mask.items():
            assert weights[name].device.type == "cpu"  # stored from the GPU on the CPU
            assert torch.count_nonzero(weights[name][~m]) == 0, (variant, name)
            assert torch.count_nonzero(weights[name][m]) > 0
