"""Dynamic sparse training (static, SET, RigL) against Evci et al. 2020."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.masks import Mask, MaskKeeper
from ticketlab.methods.dst import (
    DSTUpdater,
    drop_fraction,
    random_sparse_mask,
    update_mask,
)
from ticketlab.metrics import forward_flops, layer_macs, train_flops_per_step


def mlp(seed=0):
    return tl.models.build("lenet_300_100", (1, 8, 8), 4, width=0.1, seed=seed)


def counts(mask):
    return {n: int(m.sum()) for n, m in mask.items()}


def test_random_mask_follows_distribution():
    model = mlp()
    mask = random_sparse_mask(model, 0.2, "uniform", generator=torch.Generator().manual_seed(0))
    for _, m in mask.items():
        assert int(m.sum()) == round(0.2 * m.numel())
    erk = random_sparse_mask(model, 0.9, "erk", first_dense=True)
    assert bool(erk[erk.names()[0]].all())
    assert abs(erk.density() - 0.9) < 0.01


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_updates_preserve_layer_counts(algorithm):
    torch.manual_seed(0)
    model = mlp()
    mask = random_sparse_mask(model, 0.3, "erk", generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    keeper = MaskKeeper(model, mask)
    start = counts(mask)
    upd = DSTUpdater(algorithm, mask, delta_t=2, alpha=0.5, t_end=20)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for step in range(20):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        keeper()
        upd.after_step(step, model, opt, keeper, x, y)
        assert counts(upd.mask) == start
        assert counts(Mask.from_model(model)) == counts(Mask.from_model(model))
        for n, p in dict(model.named_parameters()).items():
            if n in upd.mask:
                assert not bool(p[~upd.mask[n]].any())  # pruned weights exactly zero
    assert len(upd.updates) == 9  # t = 2, 4, ..., 18
    assert sum(u["moved"] for u in upd.updates) > 0


def test_rigl_cosine_schedule():
    assert drop_fraction(0, 0.3, 1000) == pytest.approx(0.3)
    assert drop_fraction(500, 0.3, 1000) == pytest.approx(0.15)
    assert drop_fraction(250, 0.3, 1000) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert drop_fraction(1000, 0.3, 1000) == 0.0
    assert drop_fraction(400, 0.3, 1000, cosine=False) == 0.3


def test_grow_resets_new_and_keeps_regrown():
    """Layer of 4 weights, 2 active: drop 1 by magnitude; gradient picks the regrowth."""
    lin = nn.Linear(4, 1, bias=False)
    model = nn.Sequential(lin)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, 0.1, 0.0, 0.0]]))
    mask = Mask({"0.weight": torch.tensor([[True, True, False, False]])})
    opt = torch.optim.Adam(model.parameters())
    lin.weight.grad = torch.ones_like(lin.weight)
    opt.step()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, 0.1, 0.0, 0.0]]))
    state = opt.state[lin.weight]
    before = {k: state[k].clone() for k in ("exp_avg", "exp_avg_sq")}
    # case 1: the just-dropped weight (index 1) has the largest gradient -> regrown, kept
    grads = {"0.weight": torch.tensor([[0.0, 9.0, 1.0, 2.0]])}
    new, stats = update_mask(model, opt, mask, 0.5, "gradient", grads)
    assert new["0.weight"].tolist() == [[True, True, False, False]]
    assert stats["0.weight"]["moved"] == 0
    assert lin.weight[0, 1].item() == pytest.approx(0.1)
    for k in before:
        assert torch.equal(state[k], before[k])
    # case 2: index 3 has the largest gradient -> new connection at 0, state zeroed
    grads = {"0.weight": torch.tensor([[0.0, 1.0, 1.0, 2.0]])}
    new, stats = update_mask(model, opt, mask, 0.5, "gradient", grads)
    assert new["0.weight"].tolist() == [[True, False, False, True]]
    assert stats["0.weight"]["moved"] == 1
    assert lin.weight[0, 3].item() == 0.0 and lin.weight[0, 1].item() == 0.0
    for k in before:
        assert state[k][0, 3].item() == 0.0 and state[k][0, 1].item() == 0.0
        assert state[k][0, 0].item() == before[k][0, 0].item() != 0.0


def test_flops_hand_computed_mlp():
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))
    macs = layer_macs(model, (10,))
    assert macs == {"1.weight": 200, "3.weight": 100}
    f_d = forward_flops(macs)
    f_s = forward_flops(macs, {"1.weight": 0.1, "3.weight": 0.5})
    assert (f_d, f_s) == (300, 70)
    assert train_flops_per_step("static", f_s, f_d) == 210
    assert train_flops_per_step("set", f_s, f_d) == 210
    assert train_flops_per_step("rigl", f_s, f_d, 10) == pytest.approx((2100 + 140 + 300) / 11)


def test_erk_costs_more_than_uniform_on_conv():
    model = tl.models.build("conv2", (1, 12, 12), 4, width=0.25, seed=0)
    macs = layer_macs(model, (1, 12, 12))
    conv = [n for n in macs if n.startswith("features")]
    assert macs[conv[1]] == 16 * 16 * 9 * 144
    uni = random_sparse_mask(model, 0.1, "uniform").layer_density()
    erk = random_sparse_mask(model, 0.1, "erk").layer_density()
    assert forward_flops(macs, erk) > forward_flops(macs, uni)


def test_cli_static_set_rigl(tmp_path):
    common = [
        "--dataset", "xor", "--model", "lenet_300_100", "--width", "0.2",
        "--steps", "60it", "--batch-size", "32", "--eval-every", "30it",
        "--sparsity", "0.8", "--delta-t", "10", "--runs-dir", str(tmp_path), "--quiet",
    ]  # fmt: skip
    rows = {}
    for alg in ("static", "set", "rigl"):
        assert main(["dst", "--algorithm", alg, *common]) == 0
    for run in tmp_path.glob("dst-*"):
        for line in (run / "results.csv").read_text().splitlines()[1:]:
            rows[line.split(",")[3]] = line
        rigl = list(run.glob("replicate-0/level-1/rigl/dst_updates.jsonl"))
        if rigl:
            ups = [json.loads(s) for s in rigl[0].read_text().splitlines()]
            assert [u["step"] for u in ups] == [10, 20, 30, 40]  # T_end = 45
    assert set(rows) == {"static", "set", "rigl"}


def test_cli_bad_input(tmp_path, capsys):
    base = ["dst", "--dataset", "xor", "--runs-dir", str(tmp_path), "--quiet"]
    assert main([*base, "--sparsity", "1.5"]) == 2
    assert main([*base, "--sparsity", "0.5", "--algorithm", "nope"]) == 2
    assert main([*base, "--sparsity", "0.5", "--distribution", "global"]) == 2
    assert main([*base, "--sparsity", "0.5", "--alpha", "0"]) == 2
    assert main(base) == 2
    assert not list(tmp_path.iterdir())


def _dst_run(runs_dir, alg, *extra):
    args = [
        "dst", "--algorithm", alg, "--dataset", "xor", "--model", "lenet_300_100",
        "--width", "0.2", "--steps", "60it", "--batch-size", "32", "--eval-every", "30it",
        "--sparsity", "0.8", "--delta-t", "10", "--runs-dir", str(runs_dir), "--quiet", *extra,
    ]  # fmt: skip
    return main(args)


def _variant_dir(runs_dir, alg):
    (run,) = runs_dir.glob("dst-*")
    return run / "replicate-0" / "level-1" / alg


@pytest.mark.parametrize("alg", ["static", "set", "rigl"])
@pytest.mark.parametrize("stop_at", [25, 30])  # between an update and an evaluation; at both
def test_resume_is_bit_identical(tmp_path, monkeypatch, alg, stop_at):
    from ticketlab.methods import dst
    from ticketlab.runs import load_state
    from ticketlab.train import request_stop

    assert _dst_run(tmp_path / "whole", alg) == 0
    whole = _variant_dir(tmp_path / "whole", alg)

    real_train = dst.train
    steps = []  # the steps each call of train() takes

    class Watch:  # after the updater: stops the first run at stop_at
        def after_step(self, step, *args):
            steps.append(step)
            if step + 1 == stop_at and len(steps) == stop_at:
                request_stop()

    def watched_train(*args, callbacks=(), **kw):
        return real_train(*args, callbacks=[*callbacks, Watch()], **kw)

    monkeypatch.setattr(dst, "train", watched_train)
    assert _dst_run(tmp_path / "split", alg) != 0  # interrupted
    assert steps == list(range(stop_at))
    part = _variant_dir(tmp_path / "split", alg)
    assert (part / "checkpoint.safetensors").exists() and not (part / "result.json").exists()
    if alg != "static":
        assert (part / dst.DST_STATE).exists()
    assert _dst_run(tmp_path / "split", alg) == 0  # resumed, not started again
    assert steps == list(range(60))
    for name in ("weights_end.safetensors", "mask_end.safetensors"):
        a, b = load_state(whole / name), load_state(part / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ra, rb = (json.loads((d / "result.json").read_text()) for d in (whole, part))
    ra.pop("train_seconds"), rb.pop("train_seconds")
    assert ra == rb
    if alg != "static":
        logs = [(d / "dst_updates.jsonl").read_text() for d in (whole, part)]
        assert logs[0] == logs[1] and logs[0].count("\n") == 4
    assert not (part / "checkpoint.safetensors").exists() and not (part / dst.DST_STATE).exists()


def test_resume_restarts_when_mask_state_is_ahead(tmp_path):
    """Killed after an update, before the next checkpoint: the saved mask is too new."""
    model = mlp()
    mask = random_sparse_mask(model, 0.3, "erk", generator=torch.Generator().manual_seed(1))
    upd = DSTUpdater("set", mask, delta_t=10, alpha=0.3, t_end=50, log=tmp_path / "log.jsonl")
    upd.save_state(tmp_path / "state.safetensors", 20)
    (tmp_path / "log.jsonl").write_text('{"step": 10}\n{"step": 20}\n')
    assert not upd.restore(tmp_path / "state.safetensors", 15)
    assert upd.restore(tmp_path / "state.safetensors", 20)
    assert [u["step"] for u in upd.updates] == [10, 20]


# issue 12 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "schedule", "cosine"),
    [
        ("set", None, False),  # SET's own: a constant fraction (Mocanu et al.)
        ("set", "constant", False),
        ("set", "cosine", True),  # RigL's cosine decay, asked for
        ("rigl", None, True),  # RigL's own: cosine (Evci et al.)
        ("rigl", "constant", False),
    ],
)
def test_drop_schedule_sets_alpha_t_and_drop_counts(algorithm, schedule, cosine):
    """At update step t, each layer drops round(alpha_t * n_active), alpha_t by the schedule."""
    torch.manual_seed(0)
    model = mlp()
    mask = random_sparse_mask(model, 0.3, "erk", generator=torch.Generator().manual_seed(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    keeper = MaskKeeper(model, mask)
    alpha, t_end = 0.5, 20
    upd = DSTUpdater(algorithm, mask, delta_t=4, alpha=alpha, t_end=t_end, schedule=schedule)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 4, (16,))
    for step in range(t_end):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        keeper()
        upd.after_step(step, model, opt, keeper, x, y)
    assert [u["step"] for u in upd.updates] == [4, 8, 12, 16]
    for u in upd.updates:
        t = u["step"]
        want = alpha / 2 * (1 + math.cos(math.pi * t / t_end)) if cosine else alpha
        assert u["alpha_t"] == pytest.approx(want)
        assert u["layers"]
        for s in u["layers"].values():
            assert s["dropped"] == round(want * s["active"])


def test_drop_schedule_spec_hash_and_bad_input(tmp_path, capsys):
    from ticketlab.errors import UsageError
    from ticketlab.methods.dst import DSTSpec
    from ticketlab.spec import identity, spec_hash

    def h(**kw):
        return spec_hash(identity(DSTSpec(density=0.1, **kw), 100))

    # today's runs keep their directories: the algorithm's own schedule is the default
    assert h() == h(drop_schedule="cosine") == "a9a40c35afb6"  # rigl
    assert h(algorithm="set") == h(algorithm="set", drop_schedule="constant") == "bff1fdbb89bf"
    assert h(algorithm="set", drop_schedule="cosine") not in ("bff1fdbb89bf", "a9a40c35afb6")
    assert h(drop_schedule="constant") != h()
    assert h(algorithm="static") == h(algorithm="static", drop_schedule="cosine") == "45b727330dd3"
    assert DSTSpec(density=0.1, algorithm="set", drop_schedule="cosine").drop_schedule == "cosine"
    with pytest.raises(UsageError, match="constant, cosine"):
        DSTSpec(density=0.1, drop_schedule="linear")
    base = ["dst", "--dataset", "xor", "--runs-dir", str(tmp_path), "--quiet", "--sparsity", "0.5"]
    capsys.readouterr()
    assert main([*base, "--algorithm", "set", "--drop-schedule", "linear"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "constant, cosine" in err[0]
    assert not list(tmp_path.iterdir())


def test_cli_set_cosine_drop_schedule(tmp_path):
    assert _dst_run(tmp_path / "cos", "set", "--drop-schedule", "cosine") == 0
    assert _dst_run(tmp_path / "const", "set") == 0
    t_end = 45  # 0.75 of 60 steps
    for name, cosine in (("cos", True), ("const", False)):
        log = _variant_dir(tmp_path / name, "set") / "dst_updates.jsonl"
        ups = [json.loads(s) for s in log.read_text().splitlines()]
        assert [u["step"] for u in ups] == [10, 20, 30, 40]
        for u in ups:
            want = 0.15 * (1 + math.cos(math.pi * u["step"] / t_end)) if cosine else 0.3
            assert u["alpha_t"] == pytest.approx(want)


def test_rigl_train_flops_stop_dense_gradients_at_t_end():
    """RigL's per-step cost (App. H) for the steps before T_end, 3 f_S per step after it."""
    from ticketlab.methods.dst import train_flops_per_example as training_flops

    f_s, f_d, dt = 70.0, 300.0, 10
    rigl_step = (3 * f_s * dt + 2 * f_s + f_d) / (dt + 1)
    assert training_flops("rigl", f_s, f_d, dt, steps=100, t_end=40) == pytest.approx(
        40 * rigl_step + 60 * 3 * f_s
    )
    # with T_end = T, the paper's formula over the whole run, as before
    assert training_flops("rigl", f_s, f_d, dt, steps=100, t_end=100) == pytest.approx(
        100 * rigl_step
    )
    for alg in ("static", "set"):
        assert training_flops(alg, f_s, f_d, dt, steps=100, t_end=40) == 100 * 3 * f_s


@pytest.mark.parametrize("t_end", [0.5, 1.0])
def test_cli_rigl_train_flops_after_t_end(tmp_path, t_end):
    assert _dst_run(tmp_path, "rigl", "--t-end", str(t_end)) == 0
    row = json.loads((_variant_dir(tmp_path, "rigl") / "result.json").read_text())
    f_s, f_d, dt, steps, batch = row["forward_flops"], row["forward_flops_dense"], 10, 60, 32
    before = int(round(t_end * steps))  # 30 or 60: the steps with mask updates
    rigl_step = (3 * f_s * dt + 2 * f_s + f_d) / (dt + 1)
    per_example = before * rigl_step + (steps - before) * 3 * f_s
    assert row["train_flops"] == pytest.approx(per_example * batch)
    assert row["train_flops_vs_dense"] == pytest.approx(per_example / (steps * 3 * f_d))
