"""``load_model``: a run's trained network rebuilt from its spec and weights files.

The check is end to end: the rebuilt network's test accuracy equals the one the run
wrote to results.csv, for an IMP ticket and for a physically smaller structured net.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

import ticketlab as tl
from conftest import run_cli
from ticketlab.cli import main
from ticketlab.data import load
from ticketlab.errors import UsageError

XOR = ["--dataset", "xor", "--model", "mlp_16", "--batch-size", "50"]
XOR += ["--steps", "40it", "--eval-every", "20it", "--quiet"]


def only_run(runs: Path) -> Path:
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    return run


def recorded(run: Path, variant: str, level: int, replicate: int = 0) -> float:
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    (row,) = [
        r
        for r in rows
        if r["variant"] == variant and r["level"] == str(level) and r["replicate"] == str(replicate)
    ]
    return float(row["test_accuracy"])


@pytest.fixture(scope="module")
def lottery_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    rc = main(["lottery", *XOR, "--levels", "2", "--replicates", "2", "--runs-dir", str(runs)])
    assert rc == 0
    return only_run(runs)


def test_ticket_is_rebuilt_with_its_recorded_accuracy_and_zeros(lottery_run):
    data = load("xor", split_seed=0)
    for replicate in (0, 1):
        model = tl.load_model(lottery_run, replicate=replicate)  # last level, the ticket
        mask = tl.Mask.load(lottery_run / f"replicate-{replicate}/level-2/ticket/mask.safetensors")
        weights = tl.prunable_weights(model)
        assert all(bool((weights[k][~m] == 0).all()) for k, m in mask.items())
        nonzero = sum(int((weights[k] != 0).sum()) for k in mask.names())
        assert nonzero == mask.num_kept()
        _, acc = tl.evaluate(model, data.x_test, data.y_test)
        assert acc == pytest.approx(recorded(lottery_run, "ticket", 2, replicate), abs=1e-6)
    dense = tl.load_model(lottery_run, level=0)
    assert tl.model_density(dense) == 1.0
    start = tl.load_model(lottery_run, level=1, weights="start")
    init = tl.load_model(lottery_run, level=0, weights="start")
    kept = tl.Mask.load(lottery_run / "replicate-0/level-1/ticket/mask.safetensors")
    for k, m in kept.items():  # rewound to the initial weights, where kept
        w0, w1 = tl.prunable_weights(init)[k], tl.prunable_weights(start)[k]
        assert torch.equal(w1[m], w0[m])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"replicate": 5}, "no replicate 5; it has: replicate-0, replicate-1"),
        ({"level": 9}, "no level 9; choose from: 0, 1, 2"),
        ({"level": 2, "variant": "nope"}, "no variant 'nope'; choose from: ticket"),
        ({"weights": "middle"}, "weights must be 'end' or 'start'"),
    ],
)
def test_bad_requests_name_the_choices(lottery_run, kwargs, message):
    with pytest.raises(UsageError, match=message):
        tl.load_model(lottery_run, **kwargs)


def test_not_a_run_directory(tmp_path):
    with pytest.raises(UsageError, match="not a run directory"):
        tl.load_model(tmp_path)


def test_structured_network_comes_back_physically_smaller(tmp_path, capsys):
    args = ["structured", *XOR, "--criterion", "l1", "--sparsity", "0.5", "--runs-dir", tmp_path]
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    run = only_run(tmp_path)
    small = tl.load_model(run)  # level 1, fine-tuned
    dense = tl.load_model(run, level=0)
    assert small.hidden[0].out_features == dense.hidden[0].out_features // 2 == 8
    data = load("xor", split_seed=0)
    _, acc = tl.evaluate(small, data.x_test, data.y_test)
    assert acc == pytest.approx(recorded(run, "finetune", 1), abs=1e-6)
    _, acc = tl.evaluate(dense, data.x_test, data.y_test)
    assert acc == pytest.approx(recorded(run, "dense", 0), abs=1e-6)


@pytest.mark.parametrize("name, residual", [("vgg11", False), ("resnet20", True)])
def test_smaller_weights_rebuild_the_smaller_architecture(name, residual):
    """Only the shapes of the stored weights decide the architecture; every value is loaded."""
    from ticketlab.load import _shrunk_to
    from ticketlab.models import build
    from ticketlab.pruning.structured import remove_units, select_units, unit_scores

    shape = (3, 32, 32)
    trained = build(name, shape, 10, width=0.25, seed=1).eval()
    keep = select_units(unit_scores(trained, "l1", residual=residual), 0.5)
    small = remove_units(trained, keep).eval()
    rebuilt = _shrunk_to(build(name, shape, 10, width=0.25, seed=2), small.state_dict())
    rebuilt.load_state_dict(small.state_dict())
    x = torch.randn(4, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(x), small(x))
