"""``ticketlab sweep``: a grid of ordinary runs, each where the single command puts it."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli
from ticketlab.runs import read_csv

FIXED = """
command = "prune"
[flags]
dataset = "xor"
model = "mlp_16"
steps = "20it"
eval-every = "20it"
batch-size = 16
runs-dir = "{runs}"
"""
GRID = """
[grid]
criterion = ["magnitude", "snip"]
sparsity = [0.5, 0.8]
"""


def _file(tmp_path: Path, extra: str = GRID) -> Path:
    p = tmp_path / "sweep.toml"
    p.write_text(FIXED.format(runs=tmp_path / "runs") + extra)
    return p


def _single(capsys, tmp_path, criterion, sparsity) -> str:
    args = ["prune", "--dataset", "xor", "--model", "mlp_16", "--steps", "20it"]
    args += ["--eval-every", "20it", "--batch-size", "16", "--criterion", criterion]
    args += ["--sparsity", str(sparsity), "--runs-dir", tmp_path / "single", "--quiet"]
    assert run_cli(capsys, *args)[0] == 0
    return max((tmp_path / "single").iterdir(), key=lambda p: p.stat().st_mtime_ns).name


def test_local_sweep_runs_each_point_as_the_single_command_and_skips_on_rerun(tmp_path, capsys):
    f = _file(tmp_path)
    rc, out, _ = run_cli(capsys, "sweep", f, "--dry-run")
    assert rc == 0 and out.count("to run") == 4
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("prune-*"))
    rc, out, err = run_cli(capsys, "sweep", f, "--jobs", "2")
    assert rc == 0, err
    runs = sorted(p.name for p in (tmp_path / "runs").glob("prune-*"))
    assert len(runs) == 4
    assert _single(capsys, tmp_path, "snip", 0.8) in runs  # the same directory and hash
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("result.json")}
    rc, out, _ = run_cli(capsys, "sweep", f, "--jobs", "2")
    assert rc == 0 and out.count("skipped") == 4
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    rc, out, _ = run_cli(capsys, "sweep", f, "--dry-run")
    assert out.count("done") == 4


def test_a_failing_point_keeps_the_others_and_exits_1(tmp_path, capsys):
    extra = GRID.replace('["magnitude", "snip"]', '["magnitude"]')
    extra += '\n[[points]]\ncriterion = "magnitude"\nsparsity = 0.6\noptimizer = "sgd"\nlr = 1e8\n'
    rc, out, _ = run_cli(capsys, "sweep", _file(tmp_path, extra))
    assert rc == 1
    assert "failed" in out and "diverged" in out
    done = [p for p in (tmp_path / "runs").glob("prune-*") if (p / "results.csv").exists()]
    statuses = sorted(read_csv(p / "results.csv")[0]["status"] for p in done)
    assert statuses == ["diverged", "done", "done"]


@pytest.mark.parametrize(
    "extra, message",
    [
        ('\n[grid]\ncriterion = ["magnitude", "nope"]\nsparsity = [0.5]\n', "'nope'"),
        ("\n[grid]\nsparsity = [1.5]\n", "sparsity"),
        ("\n[grid]\nsparsity = [0.5]\nnot-a-flag = [1]\n", "unrecognized arguments"),
        ("\n[grid]\nsparsity = 3\n", "non-empty list"),
        ("\n[gird]\ncriterion = [1]\n", "unknown table"),
    ],
)
def test_bad_points_are_refused_before_anything_runs(tmp_path, capsys, extra, message):
    rc, _, err = run_cli(capsys, "sweep", _file(tmp_path, extra))
    assert rc == 2 and message in err, err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_bad_sweep_files(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sweep", tmp_path / "missing.toml")
    assert rc == 2 and "does not exist" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("command = [")
    rc, _, err = run_cli(capsys, "sweep", bad)
    assert rc == 2 and "not valid TOML" in err
    bad.write_text('command = "report"')
    rc, _, err = run_cli(capsys, "sweep", bad)
    assert rc == 2 and "choose from" in err
    rc, _, err = run_cli(capsys, "sweep", _file(tmp_path), "--executor", "slurm")
    assert rc == 2 and "local, ray" in err


def test_ray_sweep_gives_the_same_runs(tmp_path, capsys):
    pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'ticketlab[ray]')")
    f = _file(tmp_path, GRID.replace('["magnitude", "snip"]', '["snip"]'))
    rc, out, err = run_cli(capsys, "sweep", f, "--executor", "ray")
    assert rc == 0, err + out
    runs = sorted(p.name for p in (tmp_path / "runs").glob("prune-*"))
    assert len(runs) == 2 and _single(capsys, tmp_path, "snip", 0.5) in runs


def test_report_of_a_sweep_reads_like_a_papers_table(tmp_path, capsys):
    extra = GRID.replace('["magnitude", "snip"]', '["magnitude", "snip"]\nseed = [0, 1]')
    f = _file(tmp_path, extra)
    assert run_cli(capsys, "sweep", f, "--jobs", "2")[0] == 0
    rc, _, err = run_cli(capsys, "report", f, "--out", tmp_path / "rep")
    assert rc == 0, err
    page = (tmp_path / "rep" / "report.html").read_text()
    assert (tmp_path / "rep" / "sweep.png").exists()
    assert "criterion=snip, seed=1, sparsity=0.8" in page  # runs named by what differs
    assert "test accuracy % by sparsity" in page and "(n=2)" in page  # mean over two seeds
    assert "Early stop" not in page and "early-stop" not in page.lower()
    missing = tmp_path / "other.toml"
    missing.write_text(f.read_text().replace("0.8", "0.7"))
    rc, _, err = run_cli(capsys, "report", missing, "--out", tmp_path / "rep2")
    assert rc == 2 and "no results yet" in err
