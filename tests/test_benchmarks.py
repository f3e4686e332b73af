"""The benchmark scripts still run against the current API (tiny sizes; no time is asserted)."""

import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_structured_speed_runs_and_pruned_equals_masked(capsys):
    bench = _load("structured_speed")
    args = "--width 0.125 --batch 4 --rounds 2 --reps 1 --threads 1 --modes eager,channels_last"
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|pruned - masked\| = (\S+)", out).group(1))
    assert diff < 1e-4
    ratios = re.findall(r"latency ratio dense/pruned: ([\d.]+)x", out)
    assert len(ratios) == 2
    mac = float(re.search(r"multiply-add ratio: ([\d.]+)x", out).group(1))
    assert 3.5 < mac < 4.0  # half the channels of every layer: close to 4x fewer multiply-adds


def test_structured_speed_built_reference_has_the_pruned_shapes():
    from torch import nn

    from ticketlab.models import build
    from ticketlab.pruning.structured import remove_units, select_units, unit_scores

    bench = _load("structured_speed")
    dense = build("vgg11", bench.SHAPE, 10, width=0.25, seed=0).eval()
    pruned = remove_units(dense, select_units(unit_scores(dense, "bn"), 0.5))
    built = bench.VGG(bench.SHAPE, 10, bench.vgg_cfg(pruned))
    shapes = [tuple(p.shape) for p in pruned.parameters()]
    assert shapes == [tuple(p.shape) for p in built.parameters()]
    assert any(isinstance(m, nn.MaxPool2d) for m in built.modules())
