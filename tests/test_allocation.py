"""Allocation of a one-shot target over layers: global, layerwise, ER/ERK, explicit, dense."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.pruning import erk_densities, layer_densities, select
from ticketlab.pruning.allocation import erk_raw


def weighted_mean(dens, shapes):
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    return sum(dens[n] * sizes[n] for n in shapes) / sum(sizes.values())


SHAPES = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc": (256, 512), "out": (10, 256)}


@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("kernel", [True, False])
def test_erk_weighted_mean_and_caps(density, kernel):
    dens = erk_densities(SHAPES, density, kernel=kernel)
    assert weighted_mean(dens, SHAPES) == pytest.approx(density, rel=1e-12)
    assert all(0 < d <= 1.0 for d in dens.values())
    free = [n for n in SHAPES if dens[n] < 1.0]
    # the uncapped layers keep the ERK proportions
    ratios = {dens[n] / erk_raw(SHAPES[n], kernel) for n in free}
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9)
    if density == 0.5:  # the small first conv would exceed 1: it is capped
        assert dens["conv1"] == 1.0


def test_er_ignores_kernel_dims_and_erk_counts_them():
    assert erk_raw((4, 2, 3, 3), kernel=True) == pytest.approx((2 + 4 + 3 + 3) / (2 * 4 * 9))
    assert erk_raw((4, 2, 3, 3), kernel=False) == pytest.approx((2 + 4) / (2 * 4))
    assert erk_raw((10, 20)) == pytest.approx(30 / 200)


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 5)
    )


def test_layerwise_dense_layers_and_explicit():
    model = mlp()
    mask = Mask.dense(model)
    shapes = {n: tuple(m.shape) for n, m in mask.items()}
    uni = layer_densities(model, 0.3, "layerwise")
    assert set(uni.values()) == {0.3}
    keep_out = layer_densities(model, 0.3, "layerwise", dense=("output",))
    assert keep_out["4.weight"] == 1.0
    assert weighted_mean(keep_out, shapes) == pytest.approx(0.3)
    exp = layer_densities(model, 0.3, "layerwise", explicit={"0.weight": 0.5})
    assert exp["0.weight"] == 0.5
    assert weighted_mean(exp, shapes) == pytest.approx(0.3)
    erk = layer_densities(model, 0.5, "erk", dense=("first",))
    assert erk["0.weight"] == 1.0 and weighted_mean(erk, shapes) == pytest.approx(0.5)
    with pytest.raises(UsageError, match="cannot be reached"):
        layer_densities(model, 0.05, "layerwise", dense=("2.weight",))
    with pytest.raises(UsageError, match="allocation"):
        layer_densities(model, 0.3, "bogus")
    with pytest.raises(UsageError, match="density"):
        layer_densities(model, 1.0, "erk")


@pytest.mark.parametrize("allocation", ["global", "layerwise", "er", "erk"])
def test_select_counts(allocation):
    model = mlp()
    mask = Mask.dense(model)
    gen = torch.Generator().manual_seed(1)
    scores = {n: torch.rand(m.shape, generator=gen) for n, m in mask.items()}
    new = select(scores, mask, 0.25, allocation, model=model)
    if allocation == "global":
        assert new.num_kept() == round(0.25 * mask.num_total())
        flat = torch.cat([scores[n].flatten() for n in mask.names()])
        kept = torch.cat([new[n].flatten() for n in mask.names()])
        assert flat[kept].min() > flat[~kept].max()
    else:
        dens = layer_densities(model, 0.25, allocation)
        for n in mask.names():
            assert int(new[n].sum()) == round(dens[n] * mask[n].numel())
    assert new.num_kept() == pytest.approx(0.25 * mask.num_total(), abs=len(mask))


def test_select_never_revives_pruned_weights_and_keeps_dense_layers():
    model = mlp()
    mask = Mask.dense(model)
    half = Mask({n: torch.arange(m.numel()).view_as(m) % 2 == 0 for n, m in mask.items()})
    scores = {n: torch.ones(m.shape) for n, m in mask.items()}
    new = select(scores, half, 0.2, "global", dense=("output",), model=model)
    for n in mask.names():
        assert not (new[n] & ~half[n]).any()
    assert torch.equal(new["4.weight"], half["4.weight"])
    assert new.num_kept() == round(0.2 * mask.num_total())


def test_explicit_layer_densities_with_global_ranking_and_cli(tmp_path, capsys):
    from ticketlab.cli import main
    from ticketlab.models import build
    from ticketlab.pruning.allocation import explicit_densities

    model = build("lenet_300_100", (1, 28, 28), 10)
    explicit = explicit_densities(("first=0.5", "output=0.2"), model)
    assert explicit == {"hidden.0.weight": 0.5, "fc.weight": 0.2}
    dense = Mask.dense(model)
    scores = {n: torch.rand(m.shape, generator=torch.Generator().manual_seed(1))
              for n, m in dense.items()}  # fmt: skip
    mask = select(scores, dense, 0.5, "global", explicit=explicit, model=model)
    d = mask.layer_density()
    assert d["hidden.0.weight"] == pytest.approx(0.5, abs=1e-6)
    assert d["fc.weight"] == pytest.approx(0.2, abs=1e-3)
    assert mask.density() == pytest.approx(0.5, abs=1e-5)  # the middle layer takes the rest
    with pytest.raises(UsageError, match="NAME=DENSITY"):
        explicit_densities(("first",), model)
    with pytest.raises(UsageError, match="not a prunable weight"):
        explicit_densities(("nope=0.5",), model)

    args = ["prune", "--dataset", "xor", "--model", "mlp_16", "--steps", "20it"]
    args += ["--eval-every", "20it", "--batch-size", "50", "--quiet", "--criterion", "magnitude"]
    args += ["--density", "0.5", "--layer-density", "first=0.75", "--runs-dir", str(tmp_path)]
    assert main(args) == 0
    assert main(args) == 0  # the same run: nothing new
    (run,) = tmp_path.iterdir()
    m = Mask.load(run / "replicate-0" / "level-1" / "magnitude" / "mask.safetensors")
    assert m.layer_density()["hidden.0.weight"] == pytest.approx(0.75, abs=0.02)
    assert main([*args[:-4], "--layer-density", "first=x", "--runs-dir", str(tmp_path)]) == 2
    capsys.readouterr()
