"""Lottery foundation checked against what the papers define."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import ticketlab as tl
from ticketlab.masks import MaskKeeper, layer_kinds
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.pruning import layer_fractions
from ticketlab.pruning import prune as prune_mask

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
)


@pytest.fixture(scope="module")
def xor():
    return tl.data.load("xor")


def lenet(seed=0):
    return tl.models.build("lenet_300_100", (1, 28, 28), 10, init="xavier_normal", seed=seed)


def expected_kept(n: int, f: float, k: int) -> int:
    for _ in range(k):
        n -= int(round(f * n))
    return n


@pytest.mark.parametrize("levels", [1, 3, 7])
def test_layerwise_densities_follow_paper_rule(levels):
    model = lenet()
    mask = tl.Mask.dense(model)
    gen = torch.Generator().manual_seed(0)
    for _ in range(levels):
        # perturb weights so each level ranks a different order, as after training
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.01)
        mask = tl.prune(model, mask, fraction=0.2, output_fraction=0.1)
    kinds = layer_kinds(model)
    for name, m in mask.items():
        f = 0.1 if kinds[name] == "output" else 0.2
        assert int(m.sum()) == expected_kept(m.numel(), f, levels)
        assert abs(float(m.float().mean()) - (1 - f) ** levels) < 2e-3
    # Frankle & Carbin: Pm = (265200*0.8^k + 1000*0.9^k) / 266200
    pm = (265200 * 0.8**levels + 1000 * 0.9**levels) / 266200
    assert abs(mask.density() - pm) < 1e-3


def test_pruned_weights_never_return_and_lowest_magnitudes_go():
    model = lenet()
    mask = tl.Mask.dense(model)
    first = tl.prune(model, mask, fraction=0.5)
    second = tl.prune(model, first, fraction=0.5)
    for name, w in tl.prunable_weights(model).items():
        assert not (second[name] & ~first[name]).any()
        kept, gone = w.detach().abs()[first[name]], w.detach().abs()[~first[name]]
        assert kept.min() >= gone.max()


def test_global_scope_ranks_layers_together():
    model = lenet()
    with torch.no_grad():
        model.hidden[1].weight.abs_().add_(1.0)  # the second layer's weights all larger
    names = tl.Mask.dense(model).names()
    mask = tl.prune(model, tl.Mask.dense(model), fraction=0.2, scope="global")
    assert mask.num_kept() == mask.num_total() - round(0.2 * mask.num_total())
    assert bool(mask[names[1]].all())  # nothing pruned from the scaled-up layer
    assert mask[names[0]].float().mean() < 0.8  # the others lose more than 20%


def test_conv_fc_output_fractions_and_dense_layers():
    model = tl.models.build("conv2", (3, 32, 32), 10, seed=0)
    mask = tl.Mask.dense(model)
    fr = layer_fractions(model, mask, 0.2, conv_fraction=0.1, output_fraction=0.1)
    kinds = layer_kinds(model)
    assert {kinds[n]: f for n, f in fr.items()} == {"conv": 0.1, "fc": 0.2, "output": 0.1}
    fr = layer_fractions(model, mask, 0.2, dense=("first", "output"))
    assert fr[mask.names()[0]] == 0.0 and fr[mask.names()[-1]] == 0.0
    new = prune_mask(model, mask, fr)
    assert bool(new[mask.names()[0]].all()) and bool(new[mask.names()[-1]].all())
    with pytest.raises(tl.UsageError, match="not a prunable weight"):
        layer_fractions(model, mask, 0.2, dense=("nonexistent",))


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_pruned_weights_stay_exactly_zero_through_optimizer_and_weight_decay(xor, optimizer):
    model = tl.models.build("mlp_64_64", xor.input_shape, 2, seed=1)
    mask = tl.prune(model, tl.Mask.dense(model), fraction=0.7)
    spec = tl.TrainSpec(
        steps="200it",
        batch_size=50,
        optimizer=optimizer,
        lr=0.01,
        momentum=0.9 if optimizer == "sgd" else 0.0,
        weight_decay=0.05,
        eval_every="100it",
    )
    before = tl.snapshot(model)
    tl.train(model, xor, spec, mask=mask)
    for name, w in tl.prunable_weights(model).items():
        assert torch.count_nonzero(w[~mask[name]]) == 0
        assert not torch.equal(w[mask[name]], before[name][mask[name]])  # survivors trained


def test_mask_keeper_matches_apply():
    model = lenet()
    mask = tl.prune(model, tl.Mask.dense(model), fraction=0.5)
    a, b = lenet(), lenet()
    mask.apply_(a)
    MaskKeeper(b, mask)()
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


def test_controls_definitions():
    model = lenet()
    state = tl.snapshot(model)
    mask = tl.prune(model, tl.Mask.dense(model), fraction=0.6)
    shuffled = tl.reshuffle(state, mask, seed=3)
    signed = tl.signed_constant(state, mask, "xavier_normal")
    rmask = tl.random_mask(mask, seed=4)
    for name, m in mask.items():
        # reshuffle keeps each layer's multiset of surviving values, in the kept places
        a, b = state[name][m].sort().values, shuffled[name][m].sort().values
        assert torch.equal(a, b)
        assert not torch.equal(state[name][m], shuffled[name][m])
        # signed constant: sign of the initial weight times the layer's init std
        w = state[name]
        std = (2.0 / (w.shape[0] + w.shape[1])) ** 0.5
        assert torch.allclose(signed[name], torch.sign(w) * std)
        # random mask: same layerwise count, different places
        assert int(rmask[name].sum()) == int(m.sum())
        assert not torch.equal(rmask[name], m)
    fresh = tl.random_reinit(model, "xavier_normal", seed=5)
    assert not torch.equal(fresh["hidden.0.weight"], state["hidden.0.weight"])
    assert torch.equal(tl.snapshot(model)["hidden.0.weight"], state["hidden.0.weight"])


def test_mask_save_load_roundtrip(tmp_path):
    model = lenet()
    mask = tl.prune(model, tl.Mask.dense(model), fraction=0.3)
    mask.save(tmp_path / "m.safetensors")
    assert tl.Mask.load(tmp_path / "m.safetensors") == mask
    (tmp_path / "bad.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(tl.DataError, match="corrupt"):
        tl.Mask.load(tmp_path / "bad.safetensors")


def test_lr_schedules():
    from ticketlab.spec import resolve
    from ticketlab.train import lr_at

    spec = tl.Spec(
        steps="100it",
        lr=1.0,
        schedule="step",
        milestones=("50it", "80it"),
        gamma=0.1,
        warmup="10it",
    )
    res = resolve(spec, 10)
    assert lr_at(0, spec, res) == pytest.approx(0.1)
    assert lr_at(9, spec, res) == pytest.approx(1.0)
    assert lr_at(49, spec, res) == pytest.approx(1.0)
    assert lr_at(50, spec, res) == pytest.approx(0.1)
    assert lr_at(99, spec, res) == pytest.approx(0.01)
    spec = tl.Spec(steps="100it", lr=1.0, schedule="cosine")
    res = resolve(spec, 10)
    assert lr_at(0, spec, res) == pytest.approx(1.0)
    assert lr_at(50, spec, res) == pytest.approx(0.5)
    assert lr_at(100, spec, res) == pytest.approx(0.0, abs=1e-12)


def _xor_spec(tmp_path, **kw):
    base = dict(
        dataset="xor",
        model="mlp_32_32",
        batch_size=50,
        steps="60it",
        eval_every="20it",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        schedule="cosine",
        levels=2,
        quiet=True,
        runs_dir=str(tmp_path),
    )
    base.update(kw)
    return tl.Spec(**base)


def _weights(path):
    return tl.runs.load_state(path)


def test_rewound_weights_equal_saved_ones_bit_for_bit(tmp_path, xor):
    spec = _xor_spec(tmp_path, rewind="20it", controls=("random-mask",))
    exp = LotteryExperiment(spec)
    exp.run()
    rdir = exp.dir / "replicate-0"
    rewind_state = _weights(rdir / "rewind.safetensors")
    # the saved rewind point is the dense run's weights after k steps
    model = tl.models.build(
        "mlp_32_32", xor.input_shape, 2, init=spec.init, seed=exp.seed(0, "init")
    )
    tl.train(model, exp.data, spec, end=20, data_seed=exp.seed(0, "data"))
    for k, v in tl.snapshot(model).items():
        assert torch.equal(v, rewind_state[k]), k
    for level in (1, 2):
        for variant in ("ticket", "random-mask"):
            vdir = rdir / f"level-{level}" / variant
            start = _weights(vdir / "weights_start.safetensors")
            mask = tl.Mask.load(vdir / "mask.safetensors")
            for k, v in rewind_state.items():
                expect = v * mask[k] if k in mask else v
                assert torch.equal(start[k], expect), (level, variant, k)
            end = _weights(vdir / "weights_end.safetensors")
            for k, m in mask.items():
                assert torch.count_nonzero(end[k][~m]) == 0
    rows = {(r["level"], r["variant"]): r for r in exp.run()}
    assert rows[(1, "ticket")]["steps"] == 40  # trains T - k steps


@pytest.mark.parametrize("protocol", ["finetune", "lr-rewind"])
def test_finetune_and_lr_rewind_start_from_final_weights(tmp_path, protocol):
    spec = _xor_spec(tmp_path, protocol=protocol, retrain_steps="20it", levels=1)
    exp = LotteryExperiment(spec)
    rows = {(r["level"], r["variant"]): r for r in exp.run()}
    assert rows[(1, "ticket")]["steps"] == 20
    rdir = exp.dir / "replicate-0"
    prev_end = _weights(rdir / "level-0" / "ticket" / "weights_end.safetensors")
    start = _weights(rdir / "level-1" / "ticket" / "weights_start.safetensors")
    mask = tl.Mask.load(rdir / "level-1" / "mask.safetensors")
    for k, v in prev_end.items():
        assert torch.equal(start[k], v * mask[k] if k in mask else v)


def sha256_of(paths) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(Path(p).read_bytes())
    return h.hexdigest()


LOTTERY_CMD = [
    "lottery",
    "--preset",
    "quick",
    "--steps",
    "300it",
    "--eval-every",
    "50it",
    "--levels",
    "3",
    "--controls",
    "reinit",
    "--quiet",
]


def _cli(runs_dir, extra=()):
    return [
        sys.executable,
        "-m",
        "ticketlab.cli",
        *LOTTERY_CMD,
        "--runs-dir",
        str(runs_dir),
        *extra,
    ]


@needs_fashion
def test_kill9_inside_later_level_resumes_bit_identical(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    subprocess.run(_cli(ref_dir), check=True, env=env, timeout=600)
    proc = subprocess.Popen(_cli(cut_dir), env=env)
    # wait until level 2 is training, then kill at a random moment inside it
    deadline = time.time() + 300
    target = None
    while time.time() < deadline and proc.poll() is None:
        found = list(cut_dir.glob("lottery-*/replicate-0/level-2/ticket/metrics.jsonl"))
        if found:
            target = found[0]
            break
        time.sleep(0.02)
    assert target is not None, "the run never reached level 2"
    time.sleep(random.uniform(0.0, 0.6))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not list(cut_dir.glob("lottery-*/replicate-0/level-3/ticket/result.json"))
    done = subprocess.run(_cli(cut_dir), env=env, timeout=600)
    assert done.returncode == 0
    ref = sorted(ref_dir.glob("lottery-*/replicate-*/level-*/*/weights_end.safetensors"))
    cut = sorted(cut_dir.glob("lottery-*/replicate-*/level-*/*/weights_end.safetensors"))
    assert len(ref) == len(cut) == 7
    for a, b in zip(ref, cut):
        assert sha256_of([a]) == sha256_of([b]), (a, b)


@needs_fashion
def test_sigterm_checkpoints_exits_130_and_resumes(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    ref_dir, cut_dir = tmp_path / "ref", tmp_path / "cut"
    cmd = ["--levels", "1"]
    proc = subprocess.Popen(_cli(cut_dir, cmd), env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not list(
        cut_dir.glob("lottery-*/replicate-0/level-1/ticket/metrics.jsonl")
    ):
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 130
    assert list(cut_dir.glob("lottery-*/lock")) == []  # the lock is released
    assert subprocess.run(_cli(cut_dir, cmd), env=env, timeout=600).returncode == 0
    subprocess.run(_cli(ref_dir, cmd), check=True, env=env, timeout=600)
    ref = sorted(ref_dir.glob("lottery-*/replicate-*/level-*/*/weights_end.safetensors"))
    cut = sorted(cut_dir.glob("lottery-*/replicate-*/level-*/*/weights_end.safetensors"))
    assert [sha256_of([p]) for p in ref] == [sha256_of([p]) for p in cut]


def test_resume_from_checkpoint_in_process_equals_uninterrupted(tmp_path, xor):
    from ticketlab.train import request_stop

    spec = tl.Spec(
        steps="90it", batch_size=50, optimizer="adam", lr=0.01, eval_every="30it", weight_decay=1e-3
    )
    mask = tl.prune(
        tl.models.build("mlp_32", (2,), 2, seed=0),
        tl.Mask.dense(tl.models.build("mlp_32", (2,), 2, seed=0)),
        fraction=0.5,
    )
    ref = tl.models.build("mlp_32", (2,), 2, seed=0)
    tl.train(ref, xor, spec, mask=mask)

    model = tl.models.build("mlp_32", (2,), 2, seed=0)

    def stop_between_evaluations(step, m):
        request_stop()

    with pytest.raises(tl.RunInterrupted):
        tl.train(
            model,
            xor,
            spec,
            mask=mask,
            workdir=tmp_path,
            snapshot_steps={45},
            on_snapshot=stop_between_evaluations,
        )
    resumed = tl.models.build("mlp_32", (2,), 2, seed=7)  # different weights: all from the file
    out = tl.train(resumed, xor, spec, mask=mask, workdir=tmp_path)
    for (k, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    assert out["steps"] == 90
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [int(r.split('"step": ')[1].split(",")[0].rstrip("}")) for r in rows] == [0, 30, 60, 90]


def test_mask_file_keeps_layer_order(tmp_path):
    model = lenet()
    mask = tl.Mask.dense(model)
    mask.save(tmp_path / "m.safetensors")
    assert tl.Mask.load(tmp_path / "m.safetensors").names() == mask.names()


def test_callbacks_run_around_the_optimizer_step_and_can_change_the_mask(xor):
    model = tl.models.build("mlp_32", (2,), 2, seed=0)
    dense = tl.Mask.dense(model)
    half = tl.prune(model, dense, fraction=0.5)
    seen = []

    class Probe:
        def before_step(self, step, m, optimizer):
            seen.append(("before", step))

        def after_step(self, step, m, optimizer, keeper, x, y):
            seen.append(("after", step, len(y)))
            if step == 1:
                keeper.set_mask(half)

        def on_epoch_end(self, epoch, m):
            seen.append(("epoch", epoch))

    spec = tl.Spec(steps="4it", batch_size=50, optimizer="adam", lr=0.01, eval_every="4it")
    tl.train(model, xor, spec, mask=dense, callbacks=[Probe()])
    assert seen[:4] == [("before", 0), ("after", 0, 50), ("before", 1), ("after", 1, 50)]
    assert ("epoch", 1) not in seen  # 70 steps per epoch
    seen.clear()
    tl.train(model, xor, spec.replace(steps="140it", eval_every="70it"), callbacks=[Probe()])
    assert [s for s in seen if s[0] == "epoch"] == [("epoch", 1), ("epoch", 2)]
    for name, w in tl.prunable_weights(model).items():
        assert torch.count_nonzero(w[~half[name]]) == 0


def test_callback_state_is_checkpointed_and_restored(tmp_path, xor):
    from ticketlab.train import request_stop

    class Counter:  # keeps state: the steps it saw, and a tensor summing the batch labels
        def __init__(self, stop_at=None):
            self.seen, self.total, self.stop_at = [], torch.zeros(()), stop_at

        def after_step(self, step, m, optimizer, keeper, x, y):
            self.seen.append(step)
            self.total += y.sum()
            if step + 1 == self.stop_at:
                request_stop()

        def state_dict(self):
            return {"seen": self.seen, "total": self.total}

        def load_state_dict(self, state):
            self.seen, self.total = list(state["seen"]), state["total"].clone()

    spec = tl.Spec(steps="50it", batch_size=50, optimizer="adam", lr=0.01, eval_every="20it")
    whole = Counter()
    tl.train(tl.models.build("mlp_32", (2,), 2, seed=0), xor, spec, callbacks=[whole])
    with pytest.raises(tl.RunInterrupted):
        model = tl.models.build("mlp_32", (2,), 2, seed=0)
        tl.train(model, xor, spec, workdir=tmp_path, callbacks=[object(), Counter(stop_at=25)])
    resumed = Counter()
    model = tl.models.build("mlp_32", (2,), 2, seed=0)
    tl.train(model, xor, spec, workdir=tmp_path, callbacks=[object(), resumed])
    assert resumed.seen == whole.seen == list(range(50))
    assert torch.equal(resumed.total, whole.total)
    # a checkpoint without a stateful callback's state (or with another's) cannot continue it
    with pytest.raises(tl.RunInterrupted):
        model = tl.models.build("mlp_32", (2,), 2, seed=0)
        tl.train(model, xor, spec, workdir=tmp_path / "b", callbacks=[Counter(stop_at=5)])

    class Other(Counter):
        pass

    for callbacks in ([Other()], [Counter(), Counter()]):
        with pytest.raises(tl.DataError, match="no state for callback"):
            tl.train(model, xor, spec, workdir=tmp_path / "b", callbacks=callbacks)


@pytest.mark.parametrize("protocol", ["rewind", "finetune"])
def test_train_flops_sum_every_imp_level(tmp_path, protocol):
    kw = {"rewind": "20it"} if protocol == "rewind" else {"retrain_steps": "10it"}
    spec = _xor_spec(tmp_path, protocol=protocol, controls=("random-mask",), **kw)
    rows = {(r["level"], r["variant"]): r for r in LotteryExperiment(spec).run()}
    rdir = next(tmp_path.glob("lottery-*")) / "replicate-0"

    def cost(level, variant, steps):
        # an MLP's forward pass costs one multiply-add per kept weight and example;
        # forward + backward = 3 of them, 50 examples a step
        mask = tl.Mask.load(rdir / f"level-{level}" / variant / "mask.safetensors")
        return 3 * 50 * steps * sum(int(m.sum()) for _, m in mask.items())

    retrain = 40 if protocol == "rewind" else 10  # [k, T) or the fine-tuning steps
    control = 40 if protocol == "rewind" else 60  # controls train like a rewound ticket
    level0 = cost(0, "ticket", 60)
    assert level0 == 3 * 50 * 60 * (2 * 32 + 32 * 32 + 32 * 2)  # the dense level 0
    expect = {
        (0, "ticket"): level0,
        (1, "ticket"): level0 + cost(1, "ticket", retrain),
        (1, "random-mask"): level0 + cost(1, "random-mask", control),
        (2, "ticket"): level0 + cost(1, "ticket", retrain) + cost(2, "ticket", retrain),
        (2, "random-mask"): level0 + cost(1, "ticket", retrain) + cost(2, "random-mask", control),
    }
    assert set(rows) == set(expect)
    for key, flops in expect.items():
        assert rows[key]["train_flops"] == pytest.approx(flops, rel=1e-9), key
        assert rows[key]["steps"] == {0: 60}.get(key[0], control if key[1] != "ticket" else retrain)
    from ticketlab.runs import read_csv

    for row in read_csv(rdir.parent / "results.csv"):
        flops = expect[(int(row["level"]), row["variant"])]
        assert float(row["train_flops"]) == pytest.approx(flops, rel=1e-5)
