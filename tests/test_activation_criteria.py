"""The activation-statistics criteria: variance (with bias compensation) and hebbian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ticketlab as tl
from ticketlab.masks import Mask
from ticketlab.pruning import CRITERIA, Context, select
from ticketlab.pruning.criteria import compensate_bias, input_moments


def _data(n=64, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d) + torch.arange(d) - 2.0
    y = torch.randint(0, 3, (n,), generator=g)
    return tl.data.from_tensors(x, y, x[:8], y[:8], num_classes=3)


def test_variance_compensation_keeps_mean_output():
    data = _data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    ctx = Context(data=data, batches=1, batch_size=len(data.y_train))
    dense = Mask.dense(model)
    scores = CRITERIA["variance"](model, dense, ctx)
    _, var = input_moments(model, dense, ctx)
    w = model[0].weight.detach().double()
    torch.testing.assert_close(scores["0.weight"].double(), w**2 * var["0.weight"][None, :],
                               rtol=1e-5, atol=1e-7)  # fmt: skip
    mask = select(scores, dense, 0.4)
    x = data.x_train
    before = model(x).mean(0).detach()
    compensate_bias(model, dense, mask, ctx.options["input_means"])
    mask.apply_(model)
    after = model(x).mean(0).detach()
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    # without compensation the mean moves
    torch.manual_seed(1)
    plain = nn.Sequential(nn.Linear(5, 3))
    mask.apply_(plain)
    assert not torch.allclose(plain(x).mean(0), before, atol=1e-3)


def test_variance_conv_is_per_channel():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 2, 6, 6, generator=g) * torch.tensor([1.0, 3.0]).view(1, 2, 1, 1)
    y = torch.randint(0, 2, (16,), generator=g)
    data = tl.data.from_tensors(x, y, x[:4], y[:4], num_classes=2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(48, 2))
    ctx = Context(data=data, batches=1, batch_size=16)
    scores = CRITERIA["variance"](model, Mask.dense(model), ctx)
    var = x.double().transpose(0, 1).reshape(2, -1).var(1, unbiased=False)
    w = model[0].weight.detach().double()
    expect = w**2 * var.view(1, 2, 1, 1)
    torch.testing.assert_close(scores["0.weight"].double(), expect, rtol=1e-4, atol=1e-7)


def test_hebbian_matches_numpy_corrcoef():
    data = _data(n=50, d=4, seed=3)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    ctx = Context(data=data, batches=1, batch_size=50)
    scores = CRITERIA["hebbian"](model, Mask.dense(model), ctx)
    x = data.x_train.numpy().astype(np.float64)
    h = model[0](data.x_train).detach()
    z2 = model[2](torch.relu(h)).detach().numpy().astype(np.float64)
    h64 = h.numpy().astype(np.float64)
    for name, inp, out in (("0.weight", x, h64), ("2.weight", np.maximum(h64, 0), z2)):
        ref = np.zeros((out.shape[1], inp.shape[1]))
        for i in range(out.shape[1]):
            for j in range(inp.shape[1]):
                if inp[:, j].std() > 0 and out[:, i].std() > 0:
                    ref[i, j] = abs(np.corrcoef(inp[:, j], out[:, i])[0, 1])
        np.testing.assert_allclose(scores[name].numpy(), ref, rtol=1e-4, atol=1e-5)


def test_activation_criteria_need_data():
    model = nn.Linear(3, 2)
    for name in ("variance", "hebbian"):
        with pytest.raises(tl.errors.UsageError):
            CRITERIA[name](model, Mask.dense(model), Context())


def test_prune_with_variance_compensates(tmp_path):
    from ticketlab.methods.prune import PruneExperiment, PruneSpec

    spec = PruneSpec(
        dataset="xor", model="mlp_32_32", steps="20it", batch_size=50, eval_every="20it",
        criterion="variance", density=0.5, runs_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    exp = PruneExperiment(spec)
    rows = exp.run()
    assert rows[0]["density"] == pytest.approx(0.5, abs=1e-3)
    vdir = exp.dir / "replicate-0" / "level-1" / "variance"
    start = tl.runs.load_state(vdir / "weights_start.safetensors")
    init = exp.model_fn(exp.seed(0, "init")).state_dict()
    biases = [k for k in start if k.endswith("bias")]
    assert any(not torch.equal(start[k], init[k]) for k in biases)
