"""Sanity-check controls of pruning at initialisation (``prune --controls``), end to end on XOR."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from ticketlab.cli import main
from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.methods.prune import PruneSpec

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]


def test_prune_controls_rows(tmp_path, capsys):
    args = ["prune", *XOR, "--criterion", "snip", "--density", "0.3"]
    args += ["--controls", "shuffle,reinit,invert", "--runs-dir", str(tmp_path)]
    assert main(args) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("prune-")]
    rows = {r["variant"]: r for r in csv.DictReader(open(run / "results.csv"))}
    assert set(rows) == {"snip", "shuffle", "reinit", "invert"}
    for row in rows.values():
        assert float(row["density"]) == pytest.approx(float(rows["snip"]["density"]))
        assert row["steps"] == rows["snip"]["steps"]
        for name in ("compression_ratio", "flops_speedup", "effective_density"):
            assert math.isfinite(float(row[name])), name
        assert float(row["compression_ratio"]) > 1.0
    level = Path(run, "replicate-0", "level-1")
    snip = Mask.load(level / "snip" / "mask.safetensors")
    invert = Mask.load(level / "invert" / "mask.safetensors")
    shuffle = Mask.load(level / "shuffle" / "mask.safetensors")
    assert Mask.load(level / "reinit" / "mask.safetensors") == snip
    # 30% kept: the lowest-scored 30% share no weight with the highest-scored 30%
    assert snip.jaccard(invert) == 0.0
    assert shuffle != snip
    for name in snip.names():
        assert int(shuffle[name].sum()) == int(snip[name].sum())


def test_prune_controls_are_its_own():
    assert PruneSpec(density=0.5, controls=("invert",)).controls == ("invert",)
    with pytest.raises(UsageError, match="shuffle, reinit, invert"):
        PruneSpec(density=0.5, controls=("signed-constant",))
