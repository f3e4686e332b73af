"""Gradual magnitude pruning (Zhu & Gupta 2017) and movement pruning (Sanh et al. 2020)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ticketlab as tl
from ticketlab.errors import UsageError
from ticketlab.masks import Mask
from ticketlab.methods.gradual import GradualExperiment, GradualSpec, MovementPruner
from ticketlab.pruning import CRITERIA, select
from ticketlab.pruning.schedules import cubic_sparsity, pruning_steps


def test_cubic_schedule_values():
    kw = dict(final=0.9, initial=0.1, start=100, n=4, frequency=50)
    assert cubic_sparsity(100, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(300, **kw) == pytest.approx(0.9)
    # midpoint: s_f + (s_i - s_f)(1/2)^3
    assert cubic_sparsity(200, **kw) == pytest.approx(0.9 - 0.8 / 8)
    assert cubic_sparsity(150, **kw) == pytest.approx(0.9 - 0.8 * 0.75**3)
    assert cubic_sparsity(0, **kw) == pytest.approx(0.1)
    assert cubic_sparsity(1000, **kw) == pytest.approx(0.9)
    assert pruning_steps(100, 300, 50) == [100, 150, 200, 250, 300]
    with pytest.raises(UsageError):
        pruning_steps(0, 45, 10)
    with pytest.raises(UsageError):
        pruning_steps(50, 50, 10)


def _spec(tmp_path, **kw):
    base = dict(
        dataset="xor",
        model="mlp_32_32",
        batch_size=50,
        steps="60it",
        eval_every="20it",
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        quiet=True,
        runs_dir=str(tmp_path),
        sparsity=0.8,
        start="10it",
        end="40it",
        frequency="10it",
    )
    base.update(kw)
    return GradualSpec(**base)


@pytest.mark.parametrize("allocation", ["global", "layerwise"])
def test_gradual_run_reaches_target_exactly(tmp_path, allocation):
    exp = GradualExperiment(_spec(tmp_path, allocation=allocation, initial_sparsity=0.2))
    rows = exp.run()
    vdir = exp.dir / "replicate-0" / "level-1" / "magnitude"
    mask = Mask.load(vdir / "mask_end.safetensors")
    total = mask.num_total()
    if allocation == "global":
        assert mask.num_kept() == round(0.2 * total)
    else:
        for n, m in mask.items():
            assert int(m.sum()) == round(0.2 * m.numel()), n
    assert rows[0]["density"] == pytest.approx(mask.density())
    weights = tl.runs.load_state(vdir / "weights_end.safetensors")
    for n, m in mask.items():
        assert bool((weights[n][~m] == 0).all())


def test_gradual_and_movement_default_to_every_layer_at_s_t(tmp_path):
    """Zhu & Gupta prune each layer to s_t; Sanh et al. keep the top v per matrix."""
    from ticketlab.cli import main

    assert GradualSpec().allocation == "layerwise"
    for criterion in ("magnitude", "movement"):
        out = tmp_path / criterion
        args = ["gradual", "--dataset", "xor", "--model", "mlp_32_32", "--steps", "60it"]
        args += ["--eval-every", "60it", "--batch-size", "50", "--sparsity", "0.8"]
        args += ["--start", "10it", "--end", "40it", "--every", "10it"]
        assert main([*args, "--criterion", criterion, "--runs-dir", str(out), "--quiet"]) == 0
        (vdir,) = out.glob(f"gradual-*/replicate-0/level-1/{criterion}")
        mask = Mask.load(vdir / "mask_end.safetensors")
        for n, m in mask.items():
            assert int(m.sum()) == round(0.2 * m.numel()), (criterion, n)


def test_gradual_bad_input(tmp_path):
    with pytest.raises(UsageError):
        GradualExperiment(_spec(tmp_path, end="45it"))
    with pytest.raises(UsageError):
        GradualExperiment(_spec(tmp_path, end="100it"))  # after the last step
    with pytest.raises(UsageError):
        _spec(tmp_path, criterion="snip")
    with pytest.raises(UsageError):
        _spec(tmp_path, initial_sparsity=0.9)
    assert not list(tmp_path.iterdir())


def test_cli_gradual_and_list(tmp_path):
    from ticketlab.cli import main

    assert "movement" in CRITERIA and "variance" in CRITERIA and "hebbian" in CRITERIA
    code = main(
        [
            "gradual",
            "--dataset", "xor", "--model", "mlp_32_32", "--steps", "40it",
            "--final-sparsity", "0.5", "--start", "0it", "--end", "20it", "--every", "10it",
            "--criterion", "movement", "--runs-dir", str(tmp_path), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    (run,) = tmp_path.glob("gradual-*")
    vdir = run / "replicate-0" / "level-1" / "movement"
    assert Mask.load(vdir / "mask_end.safetensors").density() == pytest.approx(0.5, abs=1e-3)
    assert (vdir / "weights_dense.safetensors").exists()


def test_movement_score_is_minus_grad_times_weight_and_pruned_weights_return():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    w0 = model[0].weight.detach().clone()
    cb = MovementPruner(model, 0.5, 0.5, [1, 2, 3])
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    # one step's score increment: -dL/dW' * W (no optimizer step, so W stays w0)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    wr = w0.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(F.linear(x, wr, model[0].bias), y), [wr])
    cb.accumulate()
    torch.testing.assert_close(cb.scores["0.weight"], -(g * w0))

    # first update (t = 1): half the weights go
    class Keeper:
        def set_mask(self, m):
            raise AssertionError("movement must not zero weights")

    cb.after_step(0, model, None, Keeper(), x, y)
    first = cb.mask["0.weight"].clone()
    assert int(first.sum()) == 6
    with torch.no_grad():
        # dense values survive under the mask; the forward uses W * M
        torch.testing.assert_close(model[0].weight, w0.detach())
        out = model(x)
        ref = F.linear(x, w0 * first, model[0].bias)
        torch.testing.assert_close(out, ref)
    # the score of a pruned weight rises: it comes back, with its dense value
    j = torch.nonzero(~first.flatten())[0, 0]
    cb.scores["0.weight"].view(-1)[j] = 1e6
    model.zero_grad()
    cb.after_step(1, model, None, Keeper(), x, y)
    assert bool(cb.mask["0.weight"].view(-1)[j])
    with torch.no_grad():
        m = cb.mask["0.weight"]
        torch.testing.assert_close(model(x), F.linear(x, w0 * m, model[0].bias))
    cb.detach()
    torch.testing.assert_close(model[0].weight.detach(), w0.detach())


def test_movement_not_for_prune_or_lottery():
    with pytest.raises(UsageError):
        tl.Spec(criterion="movement")
    from ticketlab.methods.prune import PruneSpec

    with pytest.raises(UsageError):
        PruneSpec(criterion="movement", density=0.5)
    with pytest.raises(UsageError):
        CRITERIA["movement"](nn.Linear(2, 2), Mask.dense(nn.Linear(2, 2)))
    scores = {"weight": torch.tensor([[3.0, 1.0], [2.0, 0.0]])}
    assert select(scores, Mask.dense(nn.Linear(2, 2)), 0.5).num_kept() == 2
