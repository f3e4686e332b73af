"""The training loop on a CUDA device: data and masks on the device, pruned weights
exactly zero, and a checkpoint written on the GPU that resumes on the CPU to the same
weights. Skipped where there is no CUDA device."""

from __future__ import annotations

import copy

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
