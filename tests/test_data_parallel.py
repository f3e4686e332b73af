"""Data-parallel training under torchrun (two gloo ranks on loopback): the global batch
split over the ranks gives the masks and, to float tolerance, the numbers of one process
with the same global batch; only rank 0 writes; a rank killed with -9, then the same
command, resumes to the uninterrupted result."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ticketlab.runs import load_state, read_csv, read_state_file

SRC = str(Path(__file__).resolve().parents[1] / "src")
ARGS = ["lottery", "--dataset", "xor", "--model", "mlp_16", "--batch-size", "16"]
ARGS += ["--eval-every", "10it", "--levels", "2", "--kernels", "dense", "--quiet"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _torchrun(args, runs_dir: Path, tmp: Path, **popen):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    cmd += ["-m", "ticketlab", *args, "--runs-dir", str(runs_dir)]
    env = _env()
    env["TMPDIR"] = str(tmp)  # where rank 1 keeps its mirror
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _single(args, runs_dir: Path):
    cmd = [sys.executable, "-m", "ticketlab", *args, "--runs-dir", str(runs_dir)]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True)


def _run_dir(runs: Path) -> Path:
    (run,) = runs.iterdir()
    return run


def test_two_ranks_give_the_single_process_masks_and_numbers(tmp_path):
    args = [*ARGS, "--steps", "40it"]
    one = _single(args, tmp_path / "one")
    assert one.returncode == 0, one.stderr
    proc = _torchrun(args, tmp_path / "dp", tmp_path / "scratch")
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err.decode()[-2000:]
    a, b = _run_dir(tmp_path / "one"), _run_dir(tmp_path / "dp")
    assert a.name == b.name  # the same experiment: the world size is not part of it
    for level in (1, 2):
        ma = load_file(a / "replicate-0" / f"level-{level}" / "mask.safetensors")
        mb = load_file(b / "replicate-0" / f"level-{level}" / "mask.safetensors")
        assert all(torch.equal(ma[k], mb[k]) for k in ma), level
    for ra, rb in zip(read_csv(a / "results.csv"), read_csv(b / "results.csv"), strict=True):
        assert float(rb["test_loss"]) == pytest.approx(float(ra["test_loss"]), rel=1e-4)
        assert float(rb["density"]) == float(ra["density"])
    wa = load_state(a / "replicate-0" / "level-2" / "ticket" / "weights_end.safetensors")
    wb = load_state(b / "replicate-0" / "level-2" / "ticket" / "weights_end.safetensors")
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=1e-4)
    # rank 1 wrote only its mirror, outside the run store
    assert not list(b.rglob("*rank*")) and list((tmp_path / "scratch").iterdir())


def _workers(pid: int) -> list[int]:
    """The torchrun agent's worker processes (its children running ticketlab)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids += [int(k) for k in (task / "children").read_text().split()]
    return kids


def test_a_rank_killed_with_9_then_the_same_command_resumes(tmp_path):
    args = [*ARGS, "--levels", "1", "--steps", "200it", "--checkpoint-every", "20it"]
    whole = _torchrun(args, tmp_path / "whole", tmp_path / "s1")
    _, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err.decode()[-2000:]

    proc = _torchrun(args, tmp_path / "cut", tmp_path / "s2")
    ckpt = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "cut").glob("*/replicate-0/level-1/ticket/checkpoint*"))
        if found:
            ckpt = found[0]
            break
        time.sleep(0.05)
    assert ckpt is not None, "no level-1 checkpoint appeared"
    os.kill(_workers(proc.pid)[-1], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    again = _torchrun(args, tmp_path / "cut", tmp_path / "s2")
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err.decode()[-2000:]
    a, b = _run_dir(tmp_path / "whole"), _run_dir(tmp_path / "cut")
    for level in (0, 1):
        wa = load_state(a / "replicate-0" / f"level-{level}" / "ticket" / "weights_end.safetensors")
        wb = load_state(b / "replicate-0" / f"level-{level}" / "ticket" / "weights_end.safetensors")
        assert all(torch.equal(wa[k], wb[k]) for k in wa), level


def test_a_batch_the_ranks_cannot_split_is_refused(tmp_path):
    args = [a if a != "16" else "15" for a in ARGS] + ["--steps", "10it"]
    proc = _torchrun(args, tmp_path / "runs", tmp_path / "s")
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert "does not split over 2 ranks" in err.decode()


def test_sigterm_to_the_job_checkpoints_every_rank_at_one_step(tmp_path):
    args = [*ARGS, "--levels", "0", "--steps", "100000it", "--eval-every", "50it"]
    proc = _torchrun(args, tmp_path / "runs", tmp_path / "s")
    deadline = time.time() + 240
    metrics = None
    while time.time() < deadline and proc.poll() is None:
        found = list((tmp_path / "runs").glob("*/replicate-0/level-0/ticket/metrics.jsonl"))
        if found and len(found[0].read_text().splitlines()) >= 2:
            metrics = found[0]
            break
        time.sleep(0.05)
    assert metrics is not None, "training did not start"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    steps = re.findall(r"interrupted at step (\d+); checkpoint saved", err.decode())
    assert len(steps) == 2 and steps[0] == steps[1], err.decode()[-2000:]
    _, meta = read_state_file(metrics.parent / "checkpoint.safetensors")
    assert json.loads(meta["ticketlab"])["step"] == int(steps[0])
