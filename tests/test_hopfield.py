"""HopSupSup: masks as attractors of a fixed-size Hopfield network, read back exactly
below capacity and not past it; ``supsup --store hopfield`` rows; the explicit store's
hash unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.masks.hopfield import HopfieldMemory, hamming, recall, settle, signs_of
from ticketlab.methods.supsup import SupsupExperiment, SupsupSpec
from ticketlab.runs import load_state
from ticketlab.spec import identity, spec_hash

sys.path.insert(0, str(Path(__file__).parent))
from test_supsup import easy_data  # noqa: E402

D = 64  # an 8 x 8 layer: Storkey capacity about d / sqrt(2 ln d) = 22 random patterns


def patterns(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [Mask({"w": torch.rand(8, 8, generator=gen) < 0.5}) for _ in range(n)]


def noisy(mask, fraction, seed):
    x = signs_of(mask)["w"]
    flip = torch.rand(D, generator=torch.Generator().manual_seed(seed)) < fraction
    return {"w": torch.where(flip, -x, x)}


def memory_of(masks):
    mem = HopfieldMemory({"w": (8, 8)})
    for m in masks:
        mem.store(m)
    return mem


def test_storkey_rule_and_fixed_size():
    (m,) = patterns(1)
    mem = memory_of([m])
    x = signs_of(m)["w"]
    # one pattern into an empty network: W = (x x^T - I) / d
    assert torch.allclose(mem.W["w"], (torch.outer(x, x) - torch.eye(D)) / D)
    assert torch.allclose(mem.W["w"], mem.W["w"].T)
    size = mem.numel()
    for extra in patterns(9, seed=1):
        mem.store(extra)
    assert mem.numel() == size == D * D + D  # does not grow with the masks stored
    assert mem.count == 10
    # stored patterns sit in energy minima: flipping any one entry raises E
    e0 = float(mem.energy(signs_of(m)))
    for i in range(0, D, 7):
        s = signs_of(m)["w"].clone()
        s[i] = -s[i]
        assert float(mem.energy({"w": s})) > e0


def test_masks_recovered_exactly_below_capacity():
    masks = patterns(5)
    mem = memory_of(masks)
    for i, m in enumerate(masks):
        assert mem.unstable(m) == 0  # an attractor
        start = noisy(m, 0.1, seed=i)
        assert int((start["w"] != signs_of(m)["w"]).sum()) > 0
        assert hamming(mem.to_mask(settle(mem, start)), m) == 0
        # SupSup's gradient recovery on the energy alone from the same start
        found = recall(
            mem, None, 30, gamma=1.0, lr=1.0, momentum=0.0, weight_decay=0.0, start=start
        )
        assert hamming(found, m) == 0


def test_recovery_degrades_past_capacity():
    masks = patterns(40)  # well past 0.14 d (Hebb) and d / sqrt(2 ln d) (Storkey)
    mem = memory_of(masks)
    assert sum(mem.unstable(m) > 0 for m in masks) > len(masks) // 2
    errors = [
        hamming(mem.to_mask(settle(mem, noisy(m, 0.1, seed=i))), m) for i, m in enumerate(masks)
    ]
    assert sum(e > 0 for e in errors) > len(masks) // 2
    few = memory_of(masks[:5])
    assert all(few.unstable(m) == 0 for m in masks[:5])


def test_too_large_a_layer_is_refused(tmp_path):
    with pytest.raises(UsageError, match="Hopfield network would be"):
        SupsupExperiment(
            SupsupSpec(store="hopfield", model="mlp_300", runs_dir=str(tmp_path), quiet=True),
            data=easy_data(),
        )
    with pytest.raises(UsageError, match="choose from: explicit, hopfield"):
        SupsupSpec(store="disk")


def test_explicit_store_keeps_the_hash():
    # hashes of these specs before the store existed
    assert spec_hash(identity(SupsupSpec(store="explicit"), 1000)) == "9a9c32c8a3e4"
    spec = SupsupSpec(tasks=5, dataset="mnist1d", model="mlp_32", store="explicit")
    assert spec_hash(identity(spec, 1000)) == "0ed1e4e1d797"
    assert spec_hash(identity(SupsupSpec(store="hopfield"), 1000)) != "9a9c32c8a3e4"


def test_supsup_hopfield_run(tmp_path):
    spec = SupsupSpec(
        model="mlp_64", tasks=2, steps="150it", eval_every="150it", optimizer="adam",
        lr=0.01, batch_size=100, store="hopfield", hopfield_gamma=1.5e-2,
        hopfield_batch_size=16, runs_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    exp = SupsupExperiment(spec, data=easy_data())
    rows = exp.run()
    hop = {(r["level"], r["eval_task"]): r for r in rows if r["variant"] == "hopfield"}
    given = {(r["level"], r["eval_task"]): r for r in rows if r["variant"] == "task-given"}
    assert sorted(hop) == [(0, 0), (1, 0), (1, 1)]
    for key, r in hop.items():
        # read back from the memory alone, without the task id: the stored mask exactly
        assert r["hamming"] == 0 and r["attractor_flips"] == 0, key
        assert r["test_accuracy"] == given[key]["test_accuracy"]
        assert r["stored_tasks"] == key[0] + 1
    sizes = set()
    for t in range(2):
        state = load_state(exp.dir / "replicate-0" / f"level-{t}" / "hopfield.safetensors")
        sizes.add(sum(v.numel() for v in state.values()))
        assert int(state["count"]) == t + 1
    assert len(sizes) == 1  # the same size after one task and after two
    assert SupsupExperiment(spec, data=easy_data()).run() == rows  # resumed: nothing redone
    from ticketlab.report import continual_section, load_runs

    section = continual_section(load_runs([exp.dir]), tmp_path / "report")
    assert "recovery exact up to 2 stored task(s)" in section.text
    assert "still attractors at 2 tasks" in section.text
    assert (tmp_path / "report" / "hopfield.png").stat().st_size > 0
    (table,) = [t for t in section.tables if "Hopfield network" in t.caption]
    assert [row[0] for row in table.rows] == ["1", "2"] and table.rows[1][1] == "0.0"
