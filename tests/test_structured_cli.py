"""``ticketlab structured``: train, remove units, fine-tune, Scratch-E/B (Liu et al. 2019)."""

from __future__ import annotations

import csv
import math

import pytest
import torch

from conftest import run_cli
from ticketlab.masks import Mask
from ticketlab.models import build
from ticketlab.pruning.structured import groups, remove_units
from ticketlab.runs import load_state

XOR = ["--dataset", "xor", "--model", "mlp_16_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]


def rows(run):
    return {r["variant"]: r for r in csv.DictReader(open(run / "results.csv"))}


def test_finetune_and_scratch_variants(tmp_path, capsys):
    rc, _, err = run_cli(
        capsys, "structured", *XOR, "--criterion", "l2", "--sparsity", "0.5",
        "--from-scratch", "--runs-dir", tmp_path,
    )  # fmt: skip
    assert rc == 0, err
    (run,) = tmp_path.iterdir()
    r = rows(run)
    assert set(r) == {"dense", "finetune", "scratch-e", "scratch-b"}
    ft = r["finetune"]
    # 16-16 hidden units -> 8-8: weights 2*8 + 8*8 + 8*2 of 2*16 + 16*16 + 16*2
    assert float(ft["density"]) == pytest.approx((16 + 64 + 16) / (32 + 256 + 32))
    assert float(ft["unit_density"]) == 0.5
    assert float(ft["removal_max_abs_diff"]) < 1e-5
    assert float(ft["flops_speedup"]) == pytest.approx(320 / 96, rel=1e-5)
    # measured, so only its presence and sign are checked; the Scratch rows share it
    speedup = float(ft["inference_speedup"])
    assert 0 < speedup < math.inf
    assert float(r["scratch-e"]["inference_speedup"]) == speedup
    rc, out, _ = run_cli(capsys, "show", run)
    assert rc == 0
    assert f"level 1: {320 / 96:.2f}x fewer multiply-adds, {speedup:.2f}x faster" in out
    # Scratch-B trains for the dense FLOPs, capped at 2x the budget
    assert int(r["scratch-e"]["train_steps"]) == 40
    assert int(r["scratch-b"]["train_steps"]) == 80
    # the saved unit masks rebuild the fine-tuned network's starting point exactly
    rep = run / "replicate-0"
    dense = build("mlp_16_16", (2,), 2)
    dense.load_state_dict(load_state(rep / "level-0" / "dense" / "weights_end.safetensors"))
    keep = dict(Mask.load(rep / "level-1" / "units.safetensors").items())
    small = remove_units(dense, keep)
    start = load_state(rep / "level-1" / "finetune" / "weights_start.safetensors")
    assert all(torch.equal(small.state_dict()[k], v) for k, v in start.items())
    # scratch variants start from a fresh init of the same architecture
    scratch = load_state(rep / "level-1" / "scratch-e" / "weights_start.safetensors")
    assert {k: v.shape for k, v in scratch.items()} == {k: v.shape for k, v in start.items()}
    assert not torch.equal(scratch["hidden.0.weight"], start["hidden.0.weight"])


def _bn_l1(run):
    state = load_state(run / "replicate-0" / "level-0" / "dense" / "weights_end.safetensors")
    return sum(float(v.abs().sum()) for k, v in state.items() if ".1.weight" in k)


def test_network_slimming_penalty_and_global_threshold(tiny_images, tmp_path, capsys):
    base = ["structured", "--model", "vgg11", "--width", "0.125", "--batch-size", "32"]
    base += ["--steps", "28it", "--eval-every", "28it", "--lr", "0.05", "--quiet"]
    base += ["--criterion", "bn-scale", "--sparsity", "0.6"]
    l1 = {}
    for s in ("0", "0.01"):
        rc, _, err = run_cli(capsys, *base, "--slimming-l1", s, "--runs-dir", tmp_path / s)
        assert rc == 0, err
        (run,) = (tmp_path / s).iterdir()
        l1[s] = _bn_l1(run)
        assert float(rows(run)["finetune"]["removal_max_abs_diff"]) < 1e-4
    assert l1["0.01"] < l1["0"]  # the L1 subgradient pulls every |gamma| down
    # one global threshold over all BN scales: the kept units are the top 40% overall
    state = load_state(run / "replicate-0" / "level-0" / "dense" / "weights_end.safetensors")
    keep = dict(Mask.load(run / "replicate-0" / "level-1" / "units.safetensors").items())
    norms = {g.key: g.norms[0] for g in groups(build("vgg11", (1, 12, 12), 2, 0.125))}
    gammas = torch.cat([state[f"{norms[k]}.weight"].abs() for k in keep])
    kept = torch.cat(list(keep.values()))
    assert int(kept.sum()) == round(0.4 * kept.numel())
    assert float(gammas[kept].min()) >= float(gammas[~kept].max())


def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    cases = [
        ["--criterion", "nope", "--sparsity", "0.5"],
        ["--criterion", "l1"],  # no target
        ["--criterion", "l1", "--sparsity", "1.5"],
        ["--criterion", "bn-scale", "--sparsity", "0.5"],  # no BatchNorm in an MLP
        ["--criterion", "l1", "--sparsity", "0.5", "--residual"],  # not a ResNet
        ["--criterion", "l1", "--sparsity", "0.5", "--allocation", "erk"],
    ]
    for extra in cases:
        rc, _, err = run_cli(capsys, "structured", *XOR, *extra, "--runs-dir", tmp_path / "r")
        assert rc == 2, extra
        assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()


def test_from_scratch_extends_the_same_run(tmp_path, capsys):
    base = ["structured", *XOR, "--criterion", "l1", "--density", "0.5"]
    base += ["--runs-dir", tmp_path]
    assert run_cli(capsys, *base)[0] == 0
    (run,) = tmp_path.iterdir()
    dense = run / "replicate-0" / "level-0" / "dense" / "result.json"
    before = dense.stat().st_mtime_ns
    assert set(rows(run)) == {"dense", "finetune"}
    assert run_cli(capsys, *base, "--from-scratch")[0] == 0
    assert list(tmp_path.iterdir()) == [run]  # same run, nothing retrained
    assert dense.stat().st_mtime_ns == before
    r = rows(run)
    assert set(r) == {"dense", "finetune", "scratch-e", "scratch-b"}
    # the network is timed once: the rows added later carry the fine-tune row's figure
    assert r["scratch-e"]["inference_speedup"] == r["finetune"]["inference_speedup"]


def test_finetune_lr_default_survives_a_cosine_schedule(tmp_path):
    from ticketlab.methods.structured import StructuredExperiment, StructuredSpec

    def lr(**kw):
        spec = StructuredSpec(
            model="mlp_16", dataset="xor", steps="40it", batch_size=50, lr=0.1,
            sparsity=0.5, runs_dir=str(tmp_path), quiet=True, **kw,
        )  # fmt: skip
        return StructuredExperiment(spec).finetune_lr()

    assert lr(schedule="cosine") == pytest.approx(0.001)  # the cosine ends near 0
    assert lr() == pytest.approx(0.1)  # constant: the final LR is the LR
    assert lr(schedule="step", milestones=("10it",), gamma=0.5) == pytest.approx(0.05)
    assert lr(schedule="cosine", finetune_lr=0.02) == pytest.approx(0.02)
    assert not list(tmp_path.iterdir())  # nothing written
