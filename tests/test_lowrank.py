"""Low-rank replacement: truncated SVD of each Linear and conv weight (Eckart-Young), the
factorised network, the run store and ``load_model``."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ticketlab.cli import main
from ticketlab.methods import lowrank as lowrank_mod
from ticketlab.methods.lowrank import low_rank, ranks_at
from ticketlab.metrics import multiply_adds, parameter_count
from ticketlab.models import build
from ticketlab.models.lowrank import factorise, full_rank, truncated_svd
from ticketlab.runs import load_state, read_csv


def test_the_product_at_full_rank_is_the_weight():
    g = torch.Generator().manual_seed(0)
    for shape in [(30, 12), (12, 30), (16, 3, 3, 3), (8, 32, 1, 1)]:
        w = torch.randn(shape, generator=g)
        mat = w.reshape(shape[0], -1)
        b, a, energy = truncated_svd(w, min(mat.shape))
        torch.testing.assert_close(b @ a, mat, rtol=0, atol=1e-5)
        assert abs(energy - 1.0) < 1e-9


def test_truncation_is_the_best_rank_r_approximation():
    """Eckart-Young: the Frobenius error of rank r is the norm of the dropped singular values."""
    w = torch.randn(20, 15, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    s = torch.linalg.svdvals(w)
    for r in (1, 4, 10):
        b, a, energy = truncated_svd(w, r)
        assert torch.linalg.matrix_rank(b @ a) == r
        err = torch.linalg.norm(w - b @ a)
        torch.testing.assert_close(err, s[r:].square().sum().sqrt())
        assert abs(energy - float(s[:r].square().sum() / s.square().sum())) < 1e-12


def _outputs_equal_at_full_rank(net: nn.Module, x: torch.Tensor) -> nn.Module:
    net.eval()
    small = copy.deepcopy(net)
    low_rank(small, 1.0)
    small.eval()
    torch.testing.assert_close(small(x), net(x), rtol=0, atol=1e-5)
    return small


def test_factorised_model_at_full_rank_computes_the_original():
    g = torch.Generator().manual_seed(2)
    mlp = build("lenet_300_100", (1, 12, 12), 10, 0.2, seed=1)
    small = _outputs_equal_at_full_rank(mlp, torch.randn(4, 1, 12, 12, generator=g))
    assert small.hidden[0][0].out_features == 60 and small.output_layer_name == "fc.1"
    conv = build("conv2", (3, 10, 10), 10, 0.25, seed=1)
    small = _outputs_equal_at_full_rank(conv, torch.randn(4, 3, 10, 10, generator=g))
    first = small.features[0]
    assert isinstance(first, nn.Sequential)
    assert first[0].kernel_size == (3, 3) and first[0].out_channels == 16  # min(16, 27)
    assert first[1].kernel_size == (1, 1) and first[1].bias is not None
    mob = build("mobilenet_v1", (1, 12, 12), 10, 0.125, seed=1)
    with torch.no_grad():  # BN statistics that are not the identity
        for m in mob.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
    small = _outputs_equal_at_full_rank(mob, torch.randn(4, 1, 12, 12, generator=g))
    # depthwise convs are no matrix over their inputs: left as they are
    assert all(isinstance(b.depthwise, nn.Conv2d) for b in small.blocks)
    assert all(isinstance(b.pointwise, nn.Sequential) for b in small.blocks)


def test_ranks_and_counts_at_a_fraction():
    net = build("lenet_300_100", (1, 28, 28), 10)
    ranks = ranks_at(net, 0.25, dense=("output",))
    assert ranks == {"hidden.0": 75, "hidden.1": 25}
    factorise(net, ranks)
    expected = 784 * 75 + 75 * 300 + 300 + 300 * 25 + 25 * 100 + 100 + 100 * 10 + 10
    assert parameter_count(net) == expected
    assert multiply_adds(net, (1, 28, 28)) == expected - 300 - 100 - 10
    assert full_rank(net.fc) == 10


def _lowrank(runs, *extra):
    args = [
        "lowrank", "--dataset", "xor", "--width", "0.2", "--steps", "40it",
        "--batch-size", "32", "--eval-every", "10it", "--rank-fraction", "0.3",
        "--runs-dir", runs, "--quiet", *extra,
    ]  # fmt: skip
    return main([str(a) for a in args])


def test_run_rows_and_load_model_return_the_factorised_network(tmp_path):
    from ticketlab.load import load_model

    assert _lowrank(tmp_path) == 0
    (run,) = tmp_path.iterdir()
    rows = {r["variant"]: r for r in read_csv(run / "results.csv")}
    assert sorted(rows) == ["dense", "lowrank"]
    net = load_model(run)
    state = load_state(run / "replicate-0/level-1/lowrank/weights_end.safetensors")
    assert sorted(net.state_dict()) == sorted(state)
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert isinstance(net.hidden[0], nn.Sequential)
    assert int(rows["lowrank"]["params"]) == parameter_count(net)
    assert int(rows["lowrank"]["params"]) < int(rows["dense"]["params"])
    assert int(rows["lowrank"]["macs"]) == multiply_adds(net, (2,))
    assert 0 < float(rows["lowrank"]["svd_energy"]) < 1
    dense = load_model(run, level=0, variant="dense")
    assert isinstance(dense.hidden[0], nn.Linear)


def test_from_scratch_trains_the_factorised_network_only(tmp_path):
    assert _lowrank(tmp_path, "--from-scratch") == 0
    (run,) = tmp_path.iterdir()
    (row,) = read_csv(run / "results.csv")
    assert row["variant"] == "scratch" and int(row["steps"]) == 40
    start = load_state(run / "replicate-0/level-1/scratch/weights_start.safetensors")
    assert "hidden.0.0.weight" in start and "hidden.0.weight" not in start


def test_resume_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    from ticketlab.train import request_stop

    assert _lowrank(tmp_path / "whole") == 0
    real = lowrank_mod.Experiment._variant
    calls = []

    def stopped(self, model, vdir, *args, callbacks=(), **kw):
        calls.append(vdir.name)

        class Stop:
            def after_step(self, step, *a):
                if step == 40 + 17:  # inside the fine-tuning phase [40, 80)
                    request_stop()

        return real(self, model, vdir, *args, callbacks=[*callbacks, Stop()], **kw)

    monkeypatch.setattr(lowrank_mod.Experiment, "_variant", stopped)
    assert _lowrank(tmp_path / "split") == 130
    assert calls == ["dense", "lowrank"]
    (part,) = (tmp_path / "split").iterdir()
    vdir = part / "replicate-0" / "level-1" / "lowrank"
    assert (vdir / "checkpoint.safetensors").exists() and not (vdir / "result.json").exists()
    monkeypatch.setattr(lowrank_mod.Experiment, "_variant", real)
    assert _lowrank(tmp_path / "split") == 0
    (whole,) = (tmp_path / "whole").iterdir()
    a = load_state(whole / "replicate-0/level-1/lowrank/weights_end.safetensors")
    b = load_state(vdir / "weights_end.safetensors")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_bad_input_is_refused_and_nothing_written(tmp_path):
    base = ["lowrank", "--dataset", "xor", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(base) == 2  # no rank
    assert main([*base, "--rank-fraction", "0"]) == 2
    assert main([*base, "--rank-fraction", "1.5"]) == 2
    assert main([*base, "--rank-fraction", "0.5", "--dense-layers", "nope"]) == 2
    assert not list(tmp_path.iterdir())


def test_report_draws_low_rank_and_pruning_against_parameters(tmp_path):
    from ticketlab.report import build_report

    assert _lowrank(tmp_path / "runs") == 0
    prune = [
        "prune", "--dataset", "xor", "--width", "0.2", "--steps", "40it", "--batch-size", "32",
        "--eval-every", "20it", "--criterion", "magnitude", "--when", "trained",
        "--protocol", "finetune", "--density", "0.3", "--runs-dir", tmp_path / "runs", "--quiet",
    ]  # fmt: skip
    assert main([str(a) for a in prune]) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    page = build_report(runs, tmp_path / "report")
    assert (tmp_path / "report" / "parameters.png").exists()
    html = page.read_text()
    assert "Accuracy against parameters" in html
    low = next(r for r in runs if r.name.startswith("lowrank-"))
    row = next(r for r in read_csv(low / "results.csv") if r["variant"] == "lowrank")
    assert f"{int(row['params']):,}" in html
    pruned = next(r for r in runs if r.name.startswith("prune-"))
    prow = next(r for r in read_csv(pruned / "results.csv") if r["variant"] == "magnitude")
    total = parameter_count(build("lenet_300_100", (2,), 2, 0.2))
    assert f"{round(float(prow['density_all']) * total):,}" in html
    assert "prune: magnitude" in html and "lowrank: lowrank" in html
    section = html.split("Accuracy against parameters", 1)[1].split("</section>", 1)[0]
    assert section.count(">dense</td>") == 1  # both runs' dense networks: one line, one row
