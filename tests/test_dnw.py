"""Discovering Neural Wirings (Wortsman et al. 2019) and MobileNetV1, against the paper's
definition: the top-k edges by |w| act in the forward pass, every weight gets the
gradient of its edge (straight through), so a pruned edge whose |w| grows comes back."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ticketlab.cli import main
from ticketlab.masks import Mask
from ticketlab.masks.forward import attach, kept_count, topk_mask
from ticketlab.methods import dnw as dnw_mod
from ticketlab.methods.dnw import wire, wired_names
from ticketlab.models import build
from ticketlab.runs import load_state, read_csv


def _layer(seed=0, out=6, inp=8):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inp, out))


def test_only_the_top_k_edges_act_in_the_forward_pass():
    net = _layer()
    w = net[0].weight.detach().clone()
    x = torch.randn(5, 8)
    handle = attach(net, mode="wiring", density=0.25)
    keep = topk_mask(w, 0.25)
    assert int(keep.sum()) == kept_count(w.numel(), 0.25) == 12
    assert torch.equal(handle.current_mask()["0.weight"], keep)
    # the kept edges are exactly the 12 largest |w|
    assert w.abs()[keep].min() > w.abs()[~keep].max()
    expected = F.linear(x, w * keep, net[0].bias)
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # moving a pruned weight while it stays below the k-th |w| changes nothing
    with torch.no_grad():
        i = (~keep).flatten().nonzero()[0]
        net[0].weight.view(-1)[i] *= 0.5
    torch.testing.assert_close(net(x), expected, rtol=0, atol=0)
    # the state dict keeps its plain names: nothing was renamed or added
    assert sorted(net.state_dict()) == ["0.bias", "0.weight"]


def test_every_weight_gets_the_gradient_of_its_edge():
    net = _layer(1)
    x, y = torch.randn(7, 8), torch.randint(0, 6, (7,))
    handle = attach(net, mode="wiring", density=0.2)
    keep = handle.current_mask()["0.weight"]
    F.cross_entropy(net(x), y).backward()
    # the gradient w.r.t. the effective weight w * m, computed directly
    eff = (net[0].weight.detach() * keep).requires_grad_(True)
    F.cross_entropy(F.linear(x, eff, net[0].bias.detach()), y).backward()
    torch.testing.assert_close(net[0].weight.grad, eff.grad)
    assert bool((net[0].weight.grad[~keep] != 0).all())  # pruned edges learn too


def _grow_edge(mode: str):
    """Train one Linear whose target depends on a pruned edge only; return (the edge,
    whether it is in the wiring at the end, its |w| before and after)."""
    net = _layer(2, out=4, inp=6)
    net[0].bias.requires_grad_(False)
    w0 = net[0].weight.detach().clone()
    keep = topk_mask(w0, 0.25)
    o, i = [int(v) for v in (~keep).nonzero()[0]]  # a pruned edge
    if mode == "wiring":
        handle = attach(net, mode="wiring", density=0.25)
    else:
        handle = attach(net, Mask({"0.weight": keep}))  # the same mask, kept fixed
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x = torch.randn(32, 6, generator=g)
        target = torch.zeros(32, 4)
        target[:, o] = 3.0 * x[:, i]  # only the edge i -> o can explain it
        loss = F.mse_loss(net(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    end = handle.current_mask()["0.weight"]
    return bool(end[o, i]), float(w0[o, i].abs()), float(net[0].weight.detach()[o, i].abs())


def test_a_pruned_edge_whose_weight_grows_comes_back():
    back, before, after = _grow_edge("wiring")
    assert back and after > before + 1.0
    # with the mask kept fixed (plain sparse training) the same edge gets no gradient
    back, before, after = _grow_edge("fixed")
    assert not back and after == before


def test_mobilenet_v1_has_depthwise_separable_blocks_on_both_input_shapes():
    for shape in [(1, 28, 28), (3, 32, 32)]:
        for width in (1.0, 0.5):
            net = build("mobilenet_v1", shape, 10, width)
            convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
            depthwise = [m for m in convs if m.groups > 1]
            pointwise = [m for m in convs if m.kernel_size == (1, 1)]
            assert len(convs) == 27 and len(depthwise) == 13 and len(pointwise) == 13
            for m in depthwise:
                assert m.groups == m.in_channels == m.out_channels and m.kernel_size == (3, 3)
            assert [m.stride for m in depthwise].count((2, 2)) == 4
            assert all(m.groups == 1 for m in pointwise)
            assert convs[0].in_channels == shape[0]
            assert pointwise[-1].out_channels == round(1024 * width)
            assert net.fc.in_features == round(1024 * width)
            x = torch.randn(2, *shape)
            assert net(x).shape == (2, 10)
            assert net.blocks(net.bn(net.conv(x)).relu()).shape[2:] == (2, 2)


def test_pointwise_wires_only_the_1x1_convolutions():
    net = build("mobilenet_v1", (1, 12, 12), 10, 0.125)
    names = wired_names(net, "pointwise")
    assert names == [f"blocks.{i}.pointwise.weight" for i in range(13)]
    handle = wire(net, 0.1, "pointwise")
    mask = handle.current_mask()
    assert mask.names() == names
    for _, m in mask.items():
        assert int(m.sum()) == kept_count(m.numel(), 0.1)


def _dnw(runs, *extra):
    args = [
        "dnw", "--dataset", "fashion_mnist", "--steps", "30it", "--batch-size", "32",
        "--eval-every", "10it", "--runs-dir", runs, "--quiet", *extra,
    ]  # fmt: skip
    return main([str(a) for a in args])


def test_run_stores_the_final_wiring(tmp_path, tiny_images):
    assert _dnw(tmp_path, "--sparsity", "0.8", "--width", "0.1") == 0
    (run,) = tmp_path.iterdir()
    (row,) = read_csv(run / "results.csv")
    vdir = run / "replicate-0" / "level-1" / "dnw"
    mask = Mask.load(vdir / "mask.safetensors")
    state = load_state(vdir / "weights_end.safetensors")
    for n, m in mask.items():
        assert int(m.sum()) == kept_count(m.numel(), 0.2)
        assert int(torch.count_nonzero(state[n])) <= int(m.sum())
        assert bool((state[n][~m] == 0).all())
    assert abs(float(row["density"]) - mask.density()) < 1e-6
    assert 0.0 <= float(row["wiring_changed"]) <= 1.0


def test_load_model_returns_the_wired_network(tmp_path):
    from ticketlab.load import load_model

    args = ["--dataset", "xor", "--density", "0.25", "--width", "0.1"]
    assert _dnw(tmp_path, *args) == 0
    (run,) = tmp_path.iterdir()
    vdir = run / "replicate-0" / "level-1" / "dnw"
    state = load_state(vdir / "weights_end.safetensors")
    net = load_model(run)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    mask = Mask.load(vdir / "mask.safetensors")
    weights = dict(net.named_parameters())
    for n, m in mask.items():  # only the final wiring's edges are left
        assert bool((weights[n][~m] == 0).all()) and bool((weights[n][m] != 0).any())


def test_resume_equals_an_uninterrupted_run(tmp_path, tiny_images, monkeypatch):
    from ticketlab.train import request_stop

    assert _dnw(tmp_path / "whole", "--density", "0.3", "--width", "0.1") == 0
    real = dnw_mod.train

    class Stop:
        def after_step(self, step, *args):
            if step == 13:
                request_stop()

    def stopped(*args, callbacks=(), **kw):
        return real(*args, callbacks=[*callbacks, Stop()], **kw)

    monkeypatch.setattr(dnw_mod, "train", stopped)
    assert _dnw(tmp_path / "split", "--density", "0.3", "--width", "0.1") == 130
    (part,) = (tmp_path / "split").iterdir()
    vdir = part / "replicate-0" / "level-1" / "dnw"
    assert (vdir / "checkpoint.safetensors").exists() and not (vdir / "result.json").exists()
    monkeypatch.setattr(dnw_mod, "train", real)
    assert _dnw(tmp_path / "split", "--density", "0.3", "--width", "0.1") == 0
    (whole,) = (tmp_path / "whole").iterdir()
    for name in ("weights_end.safetensors", "mask.safetensors"):
        a = load_state(whole / "replicate-0/level-1/dnw" / name)
        b = load_state(vdir / name)
        assert sorted(a) == sorted(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_bad_input_is_refused_and_nothing_written(tmp_path, tiny_images):
    assert _dnw(tmp_path) == 2  # no target
    assert _dnw(tmp_path, "--sparsity", "0.9", "--density", "0.1") == 2
    assert _dnw(tmp_path, "--sparsity", "0.9", "--layers", "depthwise") == 2
    assert _dnw(tmp_path, "--sparsity", "0.9", "--layers", "pointwise") == 2  # an MLP has none
    assert not list(tmp_path.iterdir())


def test_pointwise_run_on_mobilenet_keeps_the_rest_dense(tmp_path, tiny_images):
    args = ["--model", "mobilenet_v1", "--width", "0.125", "--sparsity", "0.9"]
    assert _dnw(tmp_path, *args, "--layers", "pointwise") == 0
    (run,) = tmp_path.iterdir()
    (row,) = read_csv(run / "results.csv")
    assert row["layers"] == "pointwise" and float(row["wired_density"]) == 0.1
    state = load_state(run / "replicate-0" / "level-1" / "dnw" / "weights_end.safetensors")
    for name, w in state.items():
        if name.endswith("pointwise.weight"):
            assert int(torch.count_nonzero(w)) <= kept_count(w.numel(), 0.1), name
        elif name.endswith("depthwise.weight") or name in ("conv.weight", "fc.weight"):
            assert bool((w != 0).all()), name
    assert float(row["macs"]) < float(row["macs_dense"])
