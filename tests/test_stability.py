"""``ticketlab stability`` (linear mode connectivity), and ``compare`` / ``layer-reinit`` on the
lottery run it creates. XOR with a 16-unit MLP, 40 steps: a few seconds."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from ticketlab.cli import main
from ticketlab.masks import Mask
from ticketlab.runs import load_state

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]
STAB = ["stability", *XOR, "--rewind-points", "0it,20it", "--stability-levels", "0,1"]
STAB += ["--path-points", "5"]
CONTRACT = """method replicate level variant density density_all test_accuracy test_loss
    test_accuracy_at_best_val val_accuracy best_val_step train_loss train_accuracy steps
    train_seconds status""".split()


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    assert main(STAB + ["--runs-dir", str(runs)]) == 0
    return runs


def stab_dir(runs: Path) -> Path:
    (d,) = runs.glob("stability-*")
    return d


def lottery_runs(runs: Path) -> dict[int, Path]:
    """The lottery run directories under ``runs``, by their (resolved) rewind step."""
    out = {}
    for d in runs.glob("lottery-*"):
        out[json.loads((d / "spec.json").read_text())["spec"]["rewind"]] = d
    return out


def test_results_one_row_per_level_and_rewind_point(runs):
    d = stab_dir(runs)
    rows = read(d / "results.csv")
    assert set(CONTRACT + ["rewind_step", "instability", "bn_batches"]) <= set(rows[0])
    assert [(r["level"], r["rewind_step"]) for r in rows] == [
        ("0", "0"), ("0", "20"), ("1", "0"), ("1", "20"),
    ]  # fmt: skip
    assert {r["method"] for r in rows} == {"stability"}
    assert rows[0]["density"] == "1" and float(rows[2]["density"]) < 1
    assert rows[1]["steps"] == "20"  # trained [k, T)
    paths = read(d / "paths.csv")
    for r in rows:
        errs = [
            float(p["test_error"])
            for p in paths
            if (p["level"], p["rewind_step"]) == (r["level"], r["rewind_step"])
        ]
        assert len(errs) == 5 and r["path_points"] == "5"
        assert float(r["instability"]) == pytest.approx(
            max(errs) - 0.5 * (errs[0] + errs[-1]), abs=1e-5
        )
        assert float(r["instability"]) >= 0
        assert r["bn_batches"] == "0"  # an MLP has no BatchNorm
    # the masks of level 1 come from the lottery runs with the same settings, one per k
    lotteries = lottery_runs(runs)
    assert sorted(lotteries) == [0, 20]
    for r in rows:
        if r["level"] == "1":
            name = lotteries[int(r["rewind_step"])].name
            assert r["mask_run"] == name
            assert (
                d / "replicate-0" / "level-1" / f"rewind-{r['rewind_step']}" / "mask.safetensors"
            ).exists()
        else:
            assert r["mask_run"] == ""  # dense


def test_each_rewind_point_uses_the_mask_of_imp_rewound_to_it(tmp_path):
    """Frankle et al. 2020 find the subnetwork for rewind point k by IMP rewound to k: the
    copies forked at k are masked with level L of the lottery run with ``--rewind k``, and a
    lottery run made beforehand with those settings is reused, not re-run."""
    runs = tmp_path / "runs"
    assert (
        main(["lottery", *XOR, "--levels", "2", "--rewind", "20it", "--runs-dir", str(runs)]) == 0
    )
    (before,) = runs.glob("lottery-*")
    stamp = (before / "replicate-0" / "level-2" / "mask.safetensors").stat().st_mtime_ns
    stab = ["stability", *XOR, "--rewind-points", "0it,20it", "--stability-levels", "2"]
    assert main(stab + ["--path-points", "3", "--runs-dir", str(runs)]) == 0
    lotteries = lottery_runs(runs)
    assert sorted(lotteries) == [0, 20] and lotteries[20] == before
    assert (before / "replicate-0" / "level-2" / "mask.safetensors").stat().st_mtime_ns == stamp
    masks = {
        k: Mask.load(d / "replicate-0" / "level-2" / "mask.safetensors")
        for k, d in lotteries.items()
    }
    assert masks[0] != masks[20]  # level 2 prunes a ticket trained from k: they differ
    d = stab_dir(runs)
    for k in (0, 20):
        for c in (1, 2):
            end = load_state(
                d
                / "replicate-0"
                / "level-2"
                / f"rewind-{k}"
                / f"copy-{c}"
                / "weights_end.safetensors"
            )
            for name, keep in masks[k].items():
                assert torch.equal(end[name] != 0, keep), (k, c, name)


def test_same_command_reuses_the_run_and_more_points_extend_it(runs):
    d = stab_dir(runs)
    before = (d / "results.csv").read_text()
    assert main(STAB + ["--runs-dir", str(runs)]) == 0
    assert (d / "results.csv").read_text() == before
    more = [a if a != "0it,20it" else "0it,10it,20it" for a in STAB]
    assert main(more + ["--runs-dir", str(runs)]) == 0
    assert stab_dir(runs) == d  # not hashed: the same directory
    assert len(read(d / "results.csv")) == 6


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stability-levels", "-1"], "levels"),
        (["--rewind-points", "40it"], "rewind point"),
        (["--path-points", "1"], "path points"),
        (["--rewind", "20it", "--stability-levels", "0,1"], "--rewind-points"),
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, extra, message):
    rc = main(["stability", *XOR, *extra, "--runs-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0]
    assert not (tmp_path / "r").exists()


def test_a_run_made_with_one_mask_for_every_k_is_refused(runs, tmp_path, capsys):
    """Level > 0 results of an older ticketlab (one lottery mask for every k) are not reused."""
    old = tmp_path / "runs"
    shutil.copytree(runs, old)
    (old_dir,) = old.glob("stability-*")
    (old_dir / "replicate-0" / "level-1" / "rewind-20" / "mask.safetensors").unlink()
    before = sorted(p for p in old.rglob("*"))
    assert main(STAB + ["--runs-dir", str(old)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "one lottery mask for every rewind point" in err[0]
    assert sorted(p for p in old.rglob("*")) == before


def test_report_of_a_stability_run(runs, tmp_path):
    out = tmp_path / "out"
    assert main(["report", str(stab_dir(runs)), "--out", str(out), "--quiet"]) == 0
    html = (out / "report.html").read_text()
    assert "instability.png" in html and "Stability (linear mode connectivity)" in html
    assert (out / "instability.png").exists()
    assert list(out.glob("paths-*.png"))


def test_compare_and_layer_reinit_on_the_lottery_run(runs, tmp_path):
    lottery = lottery_runs(runs)[0]
    out = tmp_path / "cmp"
    assert main(["compare", str(lottery), "--out", str(out), "--quiet"]) == 0
    rows = read(out / "compare.csv")
    pair = [r for r in rows if r["layer"] == "all"]
    assert len(pair) == 1  # level 0 and level 1 of replicate 0
    assert 0 < float(pair[0]["jaccard"]) < 1  # level 1 keeps a subset of level 0
    signs = read(out / "signs.csv")
    assert all(0 <= float(s["sign_agreement"]) <= 1 for s in signs)
    assert (out / "jaccard.png").exists()
    out = tmp_path / "lr"
    assert main(["layer-reinit", str(lottery), "--out", str(out), "--quiet"]) == 0
    rows = read(out / "layer_reinit.csv")
    assert {r["reset"] for r in rows} == {"none", "initial", "random"}
    assert list(out.glob("layer-reinit-*.png"))
    assert main(["compare", str(tmp_path), "--quiet"]) == 2  # no results.csv there
