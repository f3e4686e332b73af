"""Replicates in worker processes (--jobs): the same files as one process, faults isolated."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.runs import read_csv

ARGS = ["lottery", "--dataset", "xor", "--model", "mlp_16", "--batch-size", "16"]
ARGS += ["--steps", "30it", "--eval-every", "10it", "--levels", "2", "--controls", "reinit"]
ARGS += ["--quiet"]
TIMING = {"train_seconds", "inference_speedup", "latency_ms", "dense_latency_ms"}


def _files(run: Path) -> dict[str, dict]:
    return {str(p.relative_to(run)): load_file(str(p)) for p in sorted(run.rglob("*.safetensors"))}


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_csv(run / "results.csv")]


def test_jobs_2_writes_what_jobs_1_writes(tmp_path, capsys):
    for jobs in ("1", "2"):
        rc, _, err = run_cli(
            capsys, *ARGS, "--replicates", "3", "--jobs", jobs, "--runs-dir", tmp_path / jobs
        )
        assert rc == 0, err
    (one,) = (tmp_path / "1").iterdir()
    (two,) = (tmp_path / "2").iterdir()
    assert one.name == two.name  # --jobs is not part of the run's identity
    a, b = _files(one), _files(two)
    assert sorted(a) == sorted(b) and len(a) > 10
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert _rows(one) == _rows(two)
    assert {r["replicate"] for r in _rows(two)} == {"0", "1", "2"}


def test_a_killed_worker_is_named_and_only_its_replicate_resumes(tmp_path, capsys, monkeypatch):
    original = LotteryExperiment._replicate

    def dies_on_2(self, r, levels, progress):
        if r == 2:
            os._exit(9)  # as if killed: no exception, no cleanup
        return original(self, r, levels, progress)

    monkeypatch.setattr(LotteryExperiment, "_replicate", dies_on_2)
    args = [*ARGS, "--replicates", "3", "--jobs", "2", "--runs-dir", tmp_path]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 1
    assert len(err.strip().splitlines()) == 1 and "replicate 2" in err and "died" in err
    (run,) = tmp_path.iterdir()
    assert {r["replicate"] for r in read_csv(run / "results.csv")} == {"0", "1"}
    done = {p: p.stat().st_mtime_ns for p in run.glob("replicate-[01]/**/result.json")}
    assert done
    monkeypatch.setattr(LotteryExperiment, "_replicate", original)
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    assert {r["replicate"] for r in read_csv(run / "results.csv")} == {"0", "1", "2"}
    assert {p: p.stat().st_mtime_ns for p in done} == done  # finished work was not redone


def test_jobs_must_be_a_positive_integer(tmp_path, capsys):
    rc, _, err = run_cli(capsys, *ARGS, "--jobs", "0", "--runs-dir", tmp_path)
    assert rc == 2 and "jobs" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("jobs", [2])
def test_threads_per_worker_fit_the_cores(jobs):
    from ticketlab.executors import threads_per_worker, usable_cores

    assert threads_per_worker(jobs) * jobs <= max(usable_cores(), jobs)
    assert threads_per_worker(1) == usable_cores()


def test_sigint_checkpoints_every_worker_exits_130_and_resumes(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = [a for a in ARGS if a != "--quiet"] + ["--steps", "400it", "--eval-every", "20it"]
    args += ["--replicates", "2", "--jobs", "2", "--levels", "1", "--runs-dir", str(tmp_path)]
    cmd = [sys.executable, "-m", "ticketlab.cli", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and len(list(tmp_path.glob("*/replicate-*/level-0/*/"))) < 2:
        time.sleep(0.05)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, proc.stderr.read().decode()
    (run,) = tmp_path.iterdir()
    assert not (run / "lock").exists()
    ckpts = list(run.glob("replicate-*/level-*/*/checkpoint.safetensors"))
    assert len(ckpts) == 2  # one per worker, both interrupted mid-phase
    assert subprocess.run(cmd, env=env, timeout=600, capture_output=True).returncode == 0
    assert {r["replicate"] for r in read_csv(run / "results.csv")} == {"0", "1"}


def test_controls_of_one_replicate_train_in_workers_with_the_same_files(tmp_path, capsys):
    common = [*ARGS, "--controls", "reinit,reshuffle,random-mask", "--levels", "2"]
    for jobs in ("1", "3"):
        rc, _, err = run_cli(capsys, *common, "--jobs", jobs, "--runs-dir", tmp_path / jobs)
        assert rc == 0, err
    (one,) = (tmp_path / "1").iterdir()
    (three,) = (tmp_path / "3").iterdir()
    a, b = _files(one), _files(three)
    assert sorted(a) == sorted(b)
    for name in a:
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)
    assert _rows(one) == _rows(three)
    assert {r["variant"] for r in _rows(three)} == {"ticket", "reinit", "reshuffle", "random-mask"}
