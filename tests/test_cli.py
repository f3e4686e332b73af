"""The command line against its contract (DESIGN.md: Command line, Run store).

Most calls run ``ticketlab.cli.main`` in-process (fast); two real subprocesses
check the exit codes a shell sees. Budgets are tiny: XOR with a 16-unit MLP for
the run-store behaviour, the ``quick`` preset cut to 60 steps where the paper's
layerwise densities on LeNet-300-100 are the point.
"""

from __future__ import annotations

import csv
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import one_error_line
from conftest import run_cli as cli
from ticketlab.cli import main
from ticketlab.runs import RESULT_COLUMNS, load_state

FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion = pytest.mark.skipif(
    not FASHION.exists(), reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed"
)

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]
QUICK = ["--preset", "quick", "--steps", "60it", "--eval-every", "30it", "--quiet"]

CONTRACT_COLUMNS = """method replicate level variant density density_all test_accuracy test_loss
    test_accuracy_at_best_val val_accuracy best_val_step train_loss train_accuracy steps
    train_seconds status""".split()
RUN_DIR = re.compile(r"(lottery|train)-[0-9a-f]{12}")

# LeNet-300-100 on 28x28 inputs: (shape of the weight, per-level fraction of the quick preset)
LENET_LAYERS = [((300, 784), 0.2), ((100, 300), 0.2), ((10, 100), 0.1)]
LENET_BIASES = 300 + 100 + 10


def run_dirs(runs: Path) -> list[Path]:
    return sorted(p for p in runs.iterdir() if p.is_dir()) if runs.exists() else []


def only_run_dir(runs: Path) -> Path:
    dirs = run_dirs(runs)
    assert len(dirs) == 1, dirs
    assert RUN_DIR.fullmatch(dirs[0].name), dirs[0].name
    return dirs[0]


def read_rows(run: Path) -> list[dict]:
    with open(run / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def keys(rows) -> list[tuple[int, int, str]]:
    return [(int(r["replicate"]), int(r["level"]), r["variant"]) for r in rows]


def file_ids(run: Path, pattern: str) -> dict[str, tuple[int, int]]:
    """(inode, mtime) of each matching file: an atomic rewrite changes the inode."""
    return {
        str(p.relative_to(run)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(run.glob(pattern))
    }


def expected_kept(n: int, fraction: float, levels: int) -> int:
    for _ in range(levels):
        n -= int(round(fraction * n))
    return n


@pytest.fixture
def cwd(tmp_path, monkeypatch):
    """An empty working directory, so a stray default ``runs/`` would be seen."""
    d = tmp_path / "cwd"
    d.mkdir()
    monkeypatch.chdir(d)
    return d


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One tiny lottery run with the quick preset (2 levels), shared by read-only tests."""
    runs = tmp_path_factory.mktemp("quick") / "runs"
    rc = main(["lottery", *QUICK, "--levels", "2", "--runs-dir", str(runs)])
    assert rc == 0
    return runs


# 1. bad input: exit 2, one line, nothing written ---------------------------------------------

BAD_INPUT = {
    "unknown model": (
        ["lottery", *XOR, "--model", "lenet_3000"],
        ["'lenet_3000'", "lenet_300_100", "resnet20", "conv2"],
    ),
    "unknown dataset": (
        ["lottery", *XOR, "--dataset", "imagenet9"],
        ["'imagenet9'", "fashion_mnist", "cifar10", "xor"],
    ),
    "unknown preset": (
        ["lottery", "--preset", "slow", "--quiet"],
        ["'slow'", "quick", "lenet_fashion", "conv2_cifar", "resnet20_cifar"],
    ),
    "prune fraction 0": (["lottery", *XOR, "--prune-fraction", "0"], ["prune fraction", "(0, 1)"]),
    "prune fraction 1": (["lottery", *XOR, "--prune-fraction", "1"], ["prune fraction", "(0, 1)"]),
    "prune fraction 1.5": (
        ["lottery", *XOR, "--prune-fraction", "1.5"],
        ["prune fraction", "(0, 1)", "1.5"],
    ),
    "prune fraction -0.1": (
        ["lottery", *XOR, "--prune-fraction", "-0.1"],
        ["prune fraction", "(0, 1)", "-0.1"],
    ),
    "output prune fraction 2": (
        ["lottery", *XOR, "--output-prune-fraction", "2"],
        ["output prune fraction", "(0, 1)"],
    ),
    "conv prune fraction 1": (
        ["lottery", *XOR, "--conv-prune-fraction", "1"],
        ["conv prune fraction", "(0, 1)"],
    ),
    "steps with a word": (
        ["lottery", *XOR, "--steps", "10 apples"],
        ["'10 apples'", "'2000it'"],
    ),
    "steps not a number": (["lottery", *XOR, "--steps", "abc"], ["'abc'", "step string"]),
    "steps zero": (["lottery", *XOR, "--steps", "0it"], ["steps must be positive"]),
    "eval-every not a step string": (
        ["lottery", *XOR, "--eval-every", "often"],
        ["eval-every", "'often'"],
    ),
    "unknown control": (
        ["lottery", *XOR, "--controls", "reinit,shuffle"],
        ["'shuffle'", "reinit", "reshuffle", "signed-constant", "random-mask"],
    ),
    "unknown --set key": (
        ["lottery", *XOR, "--set", "learning_rate=0.1"],
        ["'learning_rate'", "lr", "batch_size"],
    ),
    "--set without =": (["lottery", *XOR, "--set", "lr"], ["KEY=VALUE"]),
    "--set value of the wrong type": (["lottery", *XOR, "--set", "batch_size=big"], ["'big'"]),
    "lr not a number": (["lottery", *XOR, "--lr", "fast"], ["--lr", "'fast'"]),
    "lr zero": (["lottery", *XOR, "--lr", "0"], ["learning rate"]),
    "unknown flag": (["lottery", *XOR, "--sparsity-target", "0.9"], ["--sparsity-target"]),
    "unknown optimizer": (["lottery", *XOR, "--optimizer", "lion"], ["'lion'", "sgd", "adam"]),
    "unknown scope": (["lottery", *XOR, "--scope", "erk9"], ["'erk9'", "global", "layerwise"]),
    "rewind after the end": (["lottery", *XOR, "--rewind", "50it"], ["rewind", "40"]),
    "rewind at the end": (["lottery", *XOR, "--rewind", "40it"], ["rewind", "40"]),
    "unknown dense layer": (
        ["lottery", *XOR, "--dense-layers", "fc9"],
        ["'fc9'", "first", "output"],
    ),
    "train takes no levels": (["train", *XOR, "--levels", "2"], ["--levels"]),
    "no command": ([], ["command"]),
    "unknown command": (["prune2"], ["'prune2'", "lottery", "train"]),
    "unknown list section": (["list", "losses"], ["'losses'", "models"]),
}


# Values that are numbers but not usable ones.
BAD_NUMBERS = {
    "lr nan": (["lottery", *XOR, "--lr", "nan"], ["learning rate"]),
    "lr inf": (["lottery", *XOR, "--lr", "inf"], ["learning rate"]),
    "weight decay nan": (["lottery", *XOR, "--weight-decay", "nan"], ["weight decay"]),
    "eval batch size 0": (["lottery", *XOR, "--set", "eval_batch_size=0"], ["eval"]),
}
CASES = [pytest.param(*v, id=k) for k, v in BAD_INPUT.items()]
CASES += [pytest.param(*v, id=k) for k, v in BAD_NUMBERS.items()]


@pytest.mark.parametrize("args, fragments", CASES)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(args, fragments, capsys, tmp_path, cwd):
    runs = tmp_path / "runs"
    if args and args[0] in ("lottery", "train"):
        args = [*args, "--runs-dir", runs]
    rc, out, err = cli(capsys, *args)
    assert rc == 2, err
    line = one_error_line(err)
    for fragment in fragments:
        assert fragment in line, f"{fragment!r} not in {line!r}"
    assert out == ""
    assert not runs.exists()
    assert list(cwd.iterdir()) == []


def test_missing_data_says_where_it_looked_and_how_to_get_it(capsys, tmp_path, cwd, monkeypatch):
    monkeypatch.delenv("TICKETLAB_DATA", raising=False)
    empty = tmp_path / "no-data-here"
    empty.mkdir()
    runs = tmp_path / "runs"
    args = ["--dataset", "cifar10", "--model", "conv2", "--data-dir", empty, "--steps", "10it"]
    rc, out, err = cli(capsys, "lottery", *args, "--quiet", "--runs-dir", runs)
    assert rc == 2
    line = one_error_line(err)
    assert "'cifar10' not found" in line
    assert str(empty) in line  # where it looked
    assert "CIFAR-10" in line and "--data-dir" in line  # how to get it
    assert out == ""
    assert not runs.exists()
    assert list(empty.iterdir()) == []
    assert list(cwd.iterdir()) == []


def test_real_process_exit_code_for_bad_input(tmp_path):
    runs = tmp_path / "runs"
    args = ["lottery", *XOR, "--prune-fraction", "1.5", "--runs-dir", str(runs)]
    proc = subprocess.run(
        [sys.executable, "-m", "ticketlab.cli", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "(0, 1)" in one_error_line(proc.stderr)
    assert proc.stdout == ""
    assert not runs.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_real_process_argparse_error_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "ticketlab.cli", "lottery", "--lr", "fast"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--lr" in one_error_line(proc.stderr)
    assert list(tmp_path.iterdir()) == []


# 2. list ---------------------------------------------------------------------------------------

LISTED = {
    "models": ["lenet_300_100", "conv2", "conv4", "conv6", "vgg16", "resnet20", "resnet56", "mlp_"],
    "datasets": ["fashion_mnist", "mnist", "mnist1d", "cifar10", "xor"],
    "presets": ["quick", "lenet_fashion", "conv2_cifar", "resnet20_cifar", "lr=0.0012"],
    "criteria": ["magnitude", "random"],
    "methods": ["lottery", "train"],
}


@pytest.mark.parametrize("what", list(LISTED))
def test_list_section(what, capsys, monkeypatch, cwd):
    monkeypatch.setenv("COLUMNS", "250")  # rich would otherwise fold names at 80 columns
    rc, out, err = cli(capsys, "list", what)
    assert rc == 0, err
    assert err == ""
    for name in LISTED[what]:
        assert name in out, f"{name!r} missing from 'list {what}':\n{out}"
    assert list(cwd.iterdir()) == []


def test_list_presets_shows_their_settings(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, _ = cli(capsys, "list", "presets")
    assert rc == 0
    quick = out[out.index("quick") : out.index("lenet_fashion")]
    settings = """model=lenet_300_100 optimizer=adam lr=0.0012 batch_size=60 steps=400it
        prune_fraction=0.2 output_prune_fraction=0.1""".split()
    for setting in settings:
        assert setting in quick, f"{setting!r} not in the quick preset's listing:\n{quick}"
    resnet = out[out.index("resnet20_cifar") :]
    assert "milestones=80ep,120ep" in resnet and "scope=global" in resnet


def test_list_all_shows_every_section(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    rc, out, _ = cli(capsys, "list")
    assert rc == 0
    for names in LISTED.values():
        for name in names:
            assert name in out


# 3. a tiny lottery run and what it writes ------------------------------------------------------


@needs_fashion
def test_lottery_run_writes_the_contracted_store(quick_run):
    run = only_run_dir(quick_run)
    assert run.name.startswith("lottery-")
    stored = json.loads((run / "spec.json").read_text())
    assert stored["hash"] == run.name.split("-", 1)[1]
    assert stored["spec"]["lr"] == 0.0012 and stored["spec"]["steps"] == 60  # resolved values
    assert stored["spec"]["model"] == "lenet_300_100"
    assert "version" in stored

    with open(run / "results.csv", newline="") as f:
        header = next(csv.reader(f))
    missing = [c for c in CONTRACT_COLUMNS if c not in header]
    assert not missing, f"results.csv lacks {missing}"

    rows = read_rows(run)
    assert keys(rows) == [(0, 0, "ticket"), (0, 1, "ticket"), (0, 2, "ticket")]
    for r in rows:
        assert r["method"] == "lottery" and r["status"] == "done"
        assert int(r["steps"]) == 60
        assert 0.3 < float(r["test_accuracy"]) <= 1.0  # 10 classes: chance is 0.1
        assert 0 < int(r["best_val_step"]) <= 60
        # every contract column is filled (wall time included; its value is not checked)
        assert [c for c in RESULT_COLUMNS if r.get(c) in ("", None)] == []

    total_weights = sum(a * b for (a, b), _ in LENET_LAYERS)
    total_params = total_weights + LENET_BIASES
    for r in rows:
        level = int(r["level"])
        kept = {shape: expected_kept(shape[0] * shape[1], f, level) for shape, f in LENET_LAYERS}
        density = sum(kept.values()) / total_weights
        assert float(r["density"]) == pytest.approx(density, abs=1e-6), level
        # nonzero fraction of all parameters: pruned weights are exact zeros, biases may not be
        lo, hi = (
            sum(kept.values()) / total_params,
            (sum(kept.values()) + LENET_BIASES) / total_params,
        )
        assert lo - 1e-6 <= float(r["density_all"]) <= hi + 1e-6, level
        # the mask on disk has exactly round(f*n) removed per level in each layer
        mask = load_state(run / f"replicate-0/level-{level}/ticket/mask.safetensors")
        assert {tuple(t.shape): int(t.bool().sum()) for t in mask.values()} == kept
        ends = load_state(run / f"replicate-0/level-{level}/ticket/weights_end.safetensors")
        for name, m in mask.items():
            assert torch.all(ends[name][~m.bool()] == 0), f"pruned weights of {name} not zero"

    assert (run / "replicate-0/level-1/ticket/mask.safetensors").is_file()
    for level in range(3):
        vdir = run / f"replicate-0/level-{level}/ticket"
        for name in ["mask", "weights_start", "weights_end"]:
            assert (vdir / f"{name}.safetensors").is_file(), vdir / name
        for name in ["result.json", "metrics.jsonl"]:
            assert (vdir / name).is_file(), vdir / name
    assert list(run.rglob("checkpoint*")) == []
    assert list(run.rglob("*.tmp")) == []  # atomic writes leave no temporary files
    assert not (run / "lock").exists()


@needs_fashion
def test_level_tickets_rewind_to_the_original_initialisation(quick_run):
    """Rewind to step 0: each ticket starts from the dense run's start, masked."""
    run = only_run_dir(quick_run)
    init = load_state(run / "replicate-0/level-0/ticket/weights_start.safetensors")
    start = load_state(run / "replicate-0/level-2/ticket/weights_start.safetensors")
    mask = load_state(run / "replicate-0/level-2/ticket/mask.safetensors")
    for name, value in init.items():
        expected = value * mask[name].to(value.dtype) if name in mask else value
        assert torch.equal(start[name], expected), name


# 4. re-running extends, never redoes -----------------------------------------------------------


def test_rerun_skips_finished_work_and_extends_the_same_directory(capsys, tmp_path):
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--runs-dir", runs]
    assert cli(capsys, *base, "--levels", "2")[0] == 0
    run = only_run_dir(runs)
    csv_bytes = (run / "results.csv").read_bytes()
    first_rows = read_rows(run)
    csv_id = file_ids(run, "results.csv")
    weights = file_ids(run, "replicate-*/level-*/*/weights_*.safetensors")
    assert len(weights) == 6  # 3 levels x start/end

    # the same command again: nothing is trained or rewritten
    rc, out, err = cli(capsys, *base, "--levels", "2")
    assert (rc, out, err) == (0, "", "")
    assert (run / "results.csv").read_bytes() == csv_bytes
    assert file_ids(run, "results.csv") == csv_id
    assert file_ids(run, "replicate-*/level-*/*/weights_*.safetensors") == weights

    # one more level: same directory, only level 3 is new
    assert cli(capsys, *base, "--levels", "3")[0] == 0
    assert only_run_dir(runs) == run
    rows = read_rows(run)
    assert keys(rows) == [(0, k, "ticket") for k in range(4)]
    assert rows[:3] == first_rows  # earlier levels' results untouched
    assert file_ids(run, "replicate-*/level-[012]/*/weights_*.safetensors") == weights
    assert (run / "replicate-0/level-3/ticket/weights_end.safetensors").is_file()
    assert float(rows[3]["density"]) < float(rows[2]["density"])

    # a control: reinit rows join the same directory, tickets untouched
    tickets = file_ids(run, "replicate-*/level-*/ticket/*")
    assert cli(capsys, *base, "--levels", "3", "--controls", "reinit")[0] == 0
    assert only_run_dir(runs) == run
    rows = read_rows(run)
    assert sorted(keys(rows)) == sorted(
        [(0, k, "ticket") for k in range(4)] + [(0, k, "reinit") for k in (1, 2, 3)]
    )
    assert file_ids(run, "replicate-*/level-*/ticket/*") == tickets
    by_key = {k: r for k, r in zip(keys(rows), rows)}
    for k in (1, 2, 3):  # a control keeps the ticket's mask, so its density
        assert by_key[(0, k, "reinit")]["density"] == by_key[(0, k, "ticket")]["density"]
        ticket_mask = load_state(run / f"replicate-0/level-{k}/ticket/mask.safetensors")
        reinit_mask = load_state(run / f"replicate-0/level-{k}/reinit/mask.safetensors")
        assert all(torch.equal(ticket_mask[n], reinit_mask[n]) for n in ticket_mask)

    # a second replicate: new seeds, replicate-0 untouched
    rep0 = file_ids(run, "replicate-0/**/*.safetensors")
    assert cli(capsys, *base, "--levels", "3", "--controls", "reinit", "--replicates", "2")[0] == 0
    assert only_run_dir(runs) == run
    rows = read_rows(run)
    assert len(rows) == 14 and len(set(keys(rows))) == 14  # 2 x (4 tickets + 3 reinit)
    assert {r for r, _, _ in keys(rows)} == {0, 1}
    assert file_ids(run, "replicate-0/**/*.safetensors") == rep0
    init0 = load_state(run / "replicate-0/level-0/ticket/weights_start.safetensors")
    init1 = load_state(run / "replicate-1/level-0/ticket/weights_start.safetensors")
    assert init0.keys() == init1.keys()
    assert all(not torch.equal(init0[n], init1[n]) for n in init0 if n.endswith("weight"))
    assert list(run.rglob("checkpoint*")) == [] and not (run / "lock").exists()


# 5. identity: what changes the directory, and a stored spec that disagrees ---------------------


def test_a_hashed_knob_gives_another_directory_and_spelling_does_not(capsys, tmp_path):
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--levels", "1", "--runs-dir", runs]
    assert cli(capsys, *base)[0] == 0
    first = only_run_dir(runs)
    assert cli(capsys, *base, "--lr", "0.05")[0] == 0
    dirs = run_dirs(runs)
    assert len(dirs) == 2 and first in dirs
    other = next(d for d in dirs if d != first)
    assert json.loads((other / "spec.json").read_text())["spec"]["lr"] == 0.05
    # the same values spelled differently resolve to the same run
    assert cli(capsys, *base, "--set", "lr=0.05")[0] == 0
    bare_steps = ["lottery", *XOR, "--steps", "40", "--levels", "1", "--runs-dir", runs]
    assert cli(capsys, *bare_steps)[0] == 0  # '40' is 40 iterations, as '40it'
    assert run_dirs(runs) == dirs


def test_stored_identity_that_differs_is_refused(capsys, tmp_path):
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--levels", "1", "--runs-dir", runs]
    assert cli(capsys, *base)[0] == 0
    run = only_run_dir(runs)
    spec_path = run / "spec.json"
    stored = json.loads(spec_path.read_text())
    stored["identity"]["momentum"] = 0.5  # as if this run had been made with another momentum
    spec_path.write_text(json.dumps(stored))
    edited = spec_path.read_bytes()
    before = sorted(str(p) for p in run.rglob("*"))

    rc, out, err = cli(capsys, *base, "--levels", "2")
    assert rc == 2
    line = one_error_line(err)
    assert "momentum" in line and "0.5" in line
    assert spec_path.read_bytes() == edited
    assert sorted(str(p) for p in run.rglob("*")) == before  # no level 2, no lock left


def test_stored_spec_from_another_default_is_refused(capsys, tmp_path):
    """A default changed between versions: same hash, but the stored spec means another run."""
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--levels", "1", "--runs-dir", runs]
    assert cli(capsys, *base)[0] == 0
    run = only_run_dir(runs)
    spec_path = run / "spec.json"
    stored = json.loads(spec_path.read_text())
    assert "momentum" not in stored["identity"]  # at its default, so not hashed
    stored["spec"]["momentum"] = 0.5  # the run was made when momentum defaulted to 0.5
    spec_path.write_text(json.dumps(stored))

    rc, out, err = cli(capsys, *base, "--levels", "2")
    assert rc == 2
    assert "momentum" in one_error_line(err)
    assert not (run / "replicate-0/level-2").exists()


# 6. show ---------------------------------------------------------------------------------------


def table_rows(out: str) -> list[list[str]]:
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) > 2 and cells[0].isdigit():
            rows.append(cells)
    return rows


@needs_fashion
def test_show_prints_the_results_table(quick_run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    run = only_run_dir(quick_run)
    rc, out, err = cli(capsys, "show", run)
    assert rc == 0, err
    assert "ticket" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert [r[1] for r in rows] == ["100.0", "80.0", "64.1"]  # weights % per level
    accs = {int(r["level"]): 100 * float(r["test_accuracy"]) for r in read_rows(run)}
    assert [r[2] for r in rows] == [f"{accs[k]:.2f}" for k in range(3)]


def test_show_without_results_exits_2(capsys, tmp_path):
    empty = tmp_path / "lottery-000000000000"
    empty.mkdir()
    rc, out, err = cli(capsys, "show", empty)
    assert rc == 2
    assert "results.csv" in one_error_line(err)
    assert out == ""
    assert list(empty.iterdir()) == []
    rc, _, err = cli(capsys, "show", tmp_path / "nowhere")
    assert rc == 2
    one_error_line(err)
    assert not (tmp_path / "nowhere").exists()


# 7. determinism --------------------------------------------------------------------------------


@needs_fashion
def test_same_command_in_fresh_directories_gives_identical_results(quick_run, tmp_path):
    runs = tmp_path / "runs"
    assert main(["lottery", *QUICK, "--levels", "2", "--runs-dir", str(runs)]) == 0
    first, second = only_run_dir(quick_run), only_run_dir(runs)
    assert first.name == second.name  # the hash does not depend on where runs go
    a, b = read_rows(first), read_rows(second)
    assert keys(a) == keys(b)
    for column in ["test_accuracy", "test_loss", "val_accuracy", "train_loss", "density"]:
        assert [r[column] for r in a] == [r[column] for r in b], column
    for level in range(3):
        path = f"replicate-0/level-{level}/ticket/weights_end.safetensors"
        wa, wb = load_state(first / path), load_state(second / path)
        assert all(torch.equal(wa[n], wb[n]) for n in wa), level


# 8. train: the dense baseline ------------------------------------------------------------------


@needs_fashion
def test_train_writes_one_dense_row(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    runs = tmp_path / "runs"
    args = ["--preset", "quick", "--steps", "60it", "--eval-every", "30it", "--runs-dir", runs]
    rc, out, err = cli(capsys, "train", *args)  # not quiet: the table is printed
    assert rc == 0, err
    run = only_run_dir(runs)
    assert run.name.startswith("train-")
    assert "dense" in out
    rows = read_rows(run)
    assert keys(rows) == [(0, 0, "dense")]  # the preset's levels do not apply to train
    assert rows[0]["method"] == "train" and rows[0]["status"] == "done"
    assert float(rows[0]["density"]) == 1.0 and int(rows[0]["steps"]) == 60
    assert (run / "replicate-0/level-0/dense/weights_end.safetensors").is_file()
    assert not (run / "replicate-0/level-1").exists()
    assert list(run.rglob("checkpoint*")) == []


# 9. the lock ------------------------------------------------------------------------------------


def test_stale_lock_is_taken_over(capsys, tmp_path):
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--runs-dir", runs]
    assert cli(capsys, *base, "--levels", "1")[0] == 0
    run = only_run_dir(runs)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (run / "lock").write_text(f"{socket.gethostname()} {gone.pid}")
    rc, _, err = cli(capsys, *base, "--levels", "2")
    assert rc == 0, err
    assert keys(read_rows(run)) == [(0, k, "ticket") for k in range(3)]
    assert not (run / "lock").exists()


def test_live_lock_refuses(capsys, tmp_path):
    runs = tmp_path / "runs"
    base = ["lottery", *XOR, "--runs-dir", runs]
    assert cli(capsys, *base, "--levels", "1")[0] == 0
    run = only_run_dir(runs)
    csv_bytes = (run / "results.csv").read_bytes()
    holder = subprocess.Popen(["sleep", "60"])
    try:
        lock = f"{socket.gethostname()} {holder.pid}"
        (run / "lock").write_text(lock)
        before = file_ids(run, "**/*")
        rc, out, err = cli(capsys, *base, "--levels", "2")
        assert rc == 2
        line = one_error_line(err)
        assert "locked" in line and str(holder.pid) in line
        assert (run / "lock").read_text() == lock  # not stolen
        assert not (run / "replicate-0/level-2").exists()
        assert (run / "results.csv").read_bytes() == csv_bytes
        assert file_ids(run, "**/*") == before  # nothing written, spec.json included
    finally:
        holder.kill()
        holder.wait()


# the installed command, end to end ------------------------------------------------------------


def test_installed_command_runs_a_lottery(tmp_path):
    script = Path(sys.executable).with_name("ticketlab")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "ticketlab.cli"]
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [*command, "lottery", *XOR, "--levels", "1", "--runs-dir", str(runs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    run = only_run_dir(runs)
    assert keys(read_rows(run)) == [(0, 0, "ticket"), (0, 1, "ticket")]
    assert proc.stdout == ""  # --quiet
