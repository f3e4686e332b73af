"""Training masked Linear layers on CSR kernels (ticketlab.masks.sparse) against the
masked dense path, which stays the reference: same results within float tolerance,
bit-identical from run to run, exact resume, checkpoints in the dense path's format."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ticketlab as tl
import ticketlab.masks.sparse as sparse_mod
from ticketlab.errors import RunInterrupted, UsageError
from ticketlab.masks import Mask, prunable_weights
from ticketlab.masks.sparse import Pattern, SparseKernels, choose_kernels, sparse_linear
from ticketlab.methods.dst import DSTUpdater, random_sparse_mask
from ticketlab.runs import read_json
from ticketlab.spec import Spec, identity, spec_hash
from ticketlab.train import load_checkpoint, make_optimizer, request_stop


def synthetic(side: int, n: int = 1400, seed: int = 0):
    """Images labelled by a random linear teacher: 10 classes, learnable, no files."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, side, side, generator=g)
    y = (x.flatten(1) @ torch.randn(side * side, 10, generator=g)).argmax(1)
    cut = n - 200
    return tl.data.from_tensors(x[:cut], y[:cut], x[cut:], y[cut:], val_size=100, name="syn")


@pytest.fixture(scope="module")
def data28():
    return synthetic(28)


@pytest.fixture(scope="module")
def data8():
    return synthetic(8, n=900)


def lenet(side=28, seed=0):
    return tl.models.build("lenet_300_100", (1, side, side), 10, init="xavier_normal", seed=seed)


def random_mask(model, hidden=0.05, output=0.3, seed=1) -> Mask:
    g = torch.Generator().manual_seed(seed)
    return Mask(
        {
            n: torch.rand(p.shape, generator=g) < (output if n == "fc.weight" else hidden)
            for n, p in prunable_weights(model).items()
        }
    )


def spec_for(optimizer: str, kernels: str, steps: int = 200, **kw) -> Spec:
    values = {"lr": 0.05, "momentum": 0.9} if optimizer == "sgd" else {"lr": 1e-3}
    values.update(weight_decay=5e-4, batch_size=60, eval_every="100it")
    values.update(kw)
    return Spec(steps=f"{steps}it", optimizer=optimizer, kernels=kernels, **values)


# the layer ---------------------------------------------------------------------------------


@pytest.mark.parametrize("needs_input_grad", [False, True])
def test_sparse_linear_matches_masked_linear(needs_input_grad):
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(30, 50, generator=g) < 0.1
    w = (torch.randn(30, 50, generator=g) * mask).requires_grad_()
    b = torch.randn(30, generator=g, requires_grad=True)
    x = torch.randn(7, 50, generator=g, requires_grad=needs_input_grad)
    grad = torch.randn(7, 30, generator=g)
    F.linear(x, w, b).backward(grad)

    pattern = Pattern(mask, torch.device("cpu"))
    values = w.detach().flatten()[pattern.flat].clone().requires_grad_()
    b2 = b.detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_(needs_input_grad)
    y = sparse_linear(x2, values, b2, pattern)
    assert torch.allclose(y, F.linear(x, w, b), atol=1e-5)
    y.backward(grad)
    # the weight gradient exists for the kept entries only, and equals the dense one there
    assert values.grad.shape == (int(mask.sum()),)
    assert torch.allclose(values.grad, w.grad.flatten()[pattern.flat], atol=1e-5)
    assert torch.allclose(b2.grad, b.grad, atol=1e-6)
    if needs_input_grad:
        assert torch.allclose(x2.grad, x.grad, atol=1e-5)
    else:
        assert x2.grad is None


def test_pattern_csr_and_transpose_rebuild_the_weight():
    g = torch.Generator().manual_seed(3)
    mask = torch.rand(9, 13, generator=g) < 0.3
    mask[4] = False  # an empty row
    mask[:, 7] = False  # an empty column
    w = torch.randn(9, 13, generator=g) * mask
    p = Pattern(mask, torch.device("cpu"))
    values = w.flatten()[p.flat]
    assert torch.equal(p.matrix(values).to_dense(), w)
    assert torch.equal(p.matrix_t(values).to_dense(), w.t())


def test_leading_dimensions_as_f_linear():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, generator=g) < 0.5
    w = torch.randn(6, 5, generator=g) * mask
    x = torch.randn(2, 3, 5, generator=g)
    p = Pattern(mask, torch.device("cpu"))
    y = sparse_linear(x, w.flatten()[p.flat], None, p)
    assert y.shape == (2, 3, 6)
    assert torch.allclose(y, F.linear(x, w), atol=1e-6)


# training ----------------------------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_200_steps_match_the_masked_dense_path(data28, optimizer):
    """SGD with momentum and Adam, both with weight decay: the kept weights end where the
    masked dense path's do (float tolerance) and the pruned ones stay exactly zero."""
    models = {}
    mask = random_mask(lenet())
    for kernels in ("dense", "sparse"):
        model = lenet()
        out = tl.train(model, data28, spec_for(optimizer, kernels), mask)
        models[kernels] = model
        if kernels == "sparse":
            assert out["kernels"] == "sparse:hidden.0.weight,hidden.1.weight,fc.weight"
        else:
            assert out["kernels"] == "dense"
    dense, sparse = (dict(models[k].named_parameters()) for k in ("dense", "sparse"))
    for name, p in dense.items():
        assert torch.allclose(sparse[name], p, atol=1e-4, rtol=0), name
        if name in mask:
            assert torch.equal(sparse[name][~mask[name]], torch.zeros_like(p[~mask[name]]))
    # what comes back is a plain model again: no forward of ours left on it
    for module in models["sparse"].modules():
        assert "forward" not in module.__dict__


def test_sparse_training_is_bit_identical_run_to_run(data28):
    runs = []
    for _ in range(2):
        model = lenet()
        out = tl.train(model, data28, spec_for("adam", "sparse", steps=60), random_mask(model))
        runs.append((model.state_dict(), out))
    (a, ra), (b, rb) = runs
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ra.pop("train_seconds"), rb.pop("train_seconds")
    assert ra == rb


def test_optimizer_state_lives_on_the_kept_values(data28):
    model = lenet()
    mask = random_mask(model)
    mask.apply_(model)
    spec = spec_for("adam", "sparse")
    dense_opt = make_optimizer(model, spec)
    phase = SparseKernels(
        model, mask, mask.names(), dense_opt, lambda ps: make_optimizer(model, spec, ps)
    )
    x, y = data28.x_train[:60], data28.y_train[:60]
    F.cross_entropy(model(x), y).backward()
    phase.optimizer.step()
    for name, layer in phase.layers.items():
        kept = int(mask[name].sum())
        state = phase.optimizer.state[layer.values]
        assert state["exp_avg"].shape == (kept,) and state["exp_avg_sq"].shape == (kept,)
        assert prunable_weights(model)[name].grad is None  # the dense weight is not trained
    phase.close()
    # written back: the dense optimizer holds weight-shaped state, zero where pruned
    for name, w in prunable_weights(model).items():
        state = dense_opt.state[w]
        assert state["exp_avg"].shape == w.shape
        assert torch.equal(state["exp_avg"][~mask[name]], torch.zeros(int((~mask[name]).sum())))
        assert torch.equal(w[~mask[name]], torch.zeros(int((~mask[name]).sum())))


class StopAt:
    """Asks the loop to checkpoint and stop after step ``at``; never needs the dense model."""

    def __init__(self, at: int):
        self.at = at

    def dense_view(self, step: int) -> bool:
        return False

    def after_step(self, step, model, optimizer, keeper, x, y) -> None:
        if step + 1 == self.at:
            request_stop()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_inside_a_sparse_phase_is_exact(data8, tmp_path, optimizer):
    spec = spec_for(optimizer, "sparse", steps=80, eval_every="20it")
    whole = lenet(8)
    mask = random_mask(whole, hidden=0.1, output=0.5)
    ref = tl.train(whole, data8, spec, mask, workdir=tmp_path / "whole")

    part = lenet(8)
    with pytest.raises(RunInterrupted):
        tl.train(part, data8, spec, mask, workdir=tmp_path / "part", callbacks=[StopAt(30)])
    # the checkpoint is the dense path's: it loads into the dense model and optimizer, with
    # masked weights and weight-shaped optimizer state, as a dense-kernels checkpoint does
    dense_ckpt = lenet(8)
    with pytest.raises(RunInterrupted):
        tl.train(
            dense_ckpt,
            data8,
            spec.replace(kernels="dense"),
            mask,
            workdir=tmp_path / "dense",
            callbacks=[StopAt(30)],
        )
    loaded = []
    for where in ("part", "dense"):
        model = lenet(8)
        opt = make_optimizer(model, spec)
        step, extra = load_checkpoint(tmp_path / where / "checkpoint.safetensors", model, opt)
        assert step == 30
        loaded.append((model, opt, extra))
    (sm, so, sextra), (dm, do, dextra) = loaded
    assert sextra["sparse_layers"] == list(mask.names()) and dextra["sparse_layers"] == []
    for name, w in prunable_weights(sm).items():
        assert torch.equal(w[~mask[name]], torch.zeros_like(w[~mask[name]]))
    for (name, p), q in zip(dm.named_parameters(), sm.parameters()):
        assert torch.allclose(q, p, atol=1e-5, rtol=0), name
        shapes = {k: v.shape for k, v in do.state[p].items()}
        assert shapes == {k: v.shape for k, v in so.state[q].items()}, name
        assert all(v == p.shape for k, v in shapes.items() if k != "step"), name

    again = lenet(8)
    out = tl.train(again, data8, spec, mask, workdir=tmp_path / "part", callbacks=[StopAt(30)])
    for k, v in whole.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    ref.pop("train_seconds"), out.pop("train_seconds")
    assert out == ref


def test_resume_keeps_the_recorded_choice(data8, tmp_path, monkeypatch):
    """auto's timing is not repeated on resume: the checkpoint's choice is kept, so the
    resumed run computes exactly what the uninterrupted one did."""
    model = lenet(8)
    mask = random_mask(model, hidden=0.05, output=0.5)
    monkeypatch.setattr(sparse_mod, "AUTO_MIN_WEIGHTS", 0)
    monkeypatch.setattr(sparse_mod, "time_layer", lambda *a, **k: (1.0, 0.1))  # sparse wins
    spec = spec_for("adam", "auto", steps=40, eval_every="20it")
    with pytest.raises(RunInterrupted):
        tl.train(model, data8, spec, mask, workdir=tmp_path, callbacks=[StopAt(20)])

    def no_timing(*a, **k):
        raise AssertionError("timed again on resume")

    monkeypatch.setattr(sparse_mod, "time_layer", no_timing)
    out = tl.train(lenet(8), data8, spec, mask, workdir=tmp_path, callbacks=[StopAt(20)])
    assert out["kernels"] == "sparse:hidden.0.weight,hidden.1.weight"


def test_auto_is_dense_above_the_threshold_and_times_nothing(data28, monkeypatch):
    def no_timing(*a, **k):
        raise AssertionError("a dense phase paid for a timing")

    monkeypatch.setattr(sparse_mod, "time_layer", no_timing)
    model = lenet()
    out = tl.train(model, data28, spec_for("adam", "auto", steps=5), random_mask(model, 0.5, 0.5))
    assert out["kernels"] == "dense"
    out = tl.train(model, data28, spec_for("adam", "auto", steps=5))  # no mask at all
    assert out["kernels"] == "dense"


def test_auto_takes_the_layers_that_time_faster(data28, monkeypatch):
    timed = []

    def fake(module, mask, x, needs_input_grad, make_optimizer=None):
        timed.append((tuple(module.weight.shape), needs_input_grad, make_optimizer is not None))
        return (1.0, 0.5) if module.weight.shape[1] == 784 else (1.0, 0.9)

    monkeypatch.setattr(sparse_mod, "time_layer", fake)
    model = lenet()
    # hidden layers below 20% and big enough; the 1000-weight output layer never timed
    out = tl.train(model, data28, spec_for("adam", "auto", steps=5), random_mask(model, 0.05))
    assert timed == [((300, 784), False, True), ((100, 300), True, True)]
    assert out["kernels"] == "sparse:hidden.0.weight"  # 0.9 is not AUTO_GAIN faster


def test_auto_really_times(data28):
    """No stubs: the timing runs and gives a valid choice (which one depends on the machine)."""
    model = lenet()
    mask = random_mask(model, hidden=0.02)
    chosen = choose_kernels(model, mask, "auto", data28.x_train[:60])
    assert set(chosen) <= {"hidden.0.weight", "hidden.1.weight"}


def test_callbacks_that_do_not_say_when_keep_the_phase_dense(data8):
    class Penalty:
        def before_step(self, step, model, optimizer):
            pass

    class Watch:
        def after_step(self, step, *args):
            pass

    for cb in (Penalty(), Watch()):
        model = lenet(8)
        out = tl.train(
            model, data8, spec_for("sgd", "sparse", steps=3), random_mask(model), callbacks=[cb]
        )
        assert out["kernels"] == "dense"


def test_snapshots_see_the_trained_weights(data8):
    seen = {}
    model = lenet(8)
    mask = random_mask(model, hidden=0.1, output=0.5)
    tl.train(
        model,
        data8,
        spec_for("adam", "sparse", steps=10),
        mask,
        snapshot_steps={5},
        on_snapshot=lambda step, m: seen.update({k: v.clone() for k, v in m.state_dict().items()}),
    )
    ref = lenet(8)
    tl.train(ref, data8, spec_for("adam", "sparse", steps=5), mask)
    for k, v in ref.state_dict().items():
        assert torch.equal(seen[k], v), k


# dynamic sparse training -------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["set", "rigl"])
def test_set_and_rigl_on_sparse_kernels_match_dense(data8, algorithm):
    """Between mask updates the CSR layers train; at an update the loop writes back, the
    updater works on the dense model and optimizer, and the CSR layers are rebuilt."""
    results = {}
    for kernels in ("dense", "sparse"):
        model = lenet(8)
        mask = random_sparse_mask(model, 0.1, "erk", False, torch.Generator().manual_seed(2))
        mask.apply_(model)
        updater = DSTUpdater(
            algorithm, mask, delta_t=10, alpha=0.3, t_end=50,
            generator=torch.Generator().manual_seed(3),
        )  # fmt: skip
        out = tl.train(model, data8, spec_for("sgd", kernels, steps=60), mask, callbacks=[updater])
        results[kernels] = (model, updater, out)
    (dm, du, dout), (sm, su, sout) = results["dense"], results["sparse"]
    assert dout["kernels"] == "dense" and sout["kernels"].startswith("sparse:")
    assert len(su.updates) == len(du.updates) == 4
    assert su.mask == du.mask
    for (name, p), q in zip(dm.named_parameters(), sm.parameters()):
        assert torch.allclose(q, p, atol=1e-4, rtol=0), name


@pytest.mark.parametrize("algorithm", ["static", "rigl"])
def test_dst_command_on_sparse_kernels_resumes_bit_identical(tmp_path, monkeypatch, algorithm):
    from safetensors.torch import load_file

    from ticketlab.cli import main
    from ticketlab.methods import dst

    def run(runs_dir):
        args = [
            "dst", "--algorithm", algorithm, "--dataset", "xor", "--model", "lenet_300_100",
            "--steps", "60it", "--batch-size", "32", "--eval-every", "30it", "--sparsity",
            "0.95", "--delta-t", "10", "--kernels", "sparse", "--runs-dir", str(runs_dir),
            "--quiet",
        ]  # fmt: skip
        return main(args)

    assert run(tmp_path / "whole") == 0
    real_train = dst.train
    calls = []

    def stopped_train(*args, callbacks=(), **kw):
        calls.append(1)
        extra = [StopAt(25)] if len(calls) == 1 else []
        return real_train(*args, callbacks=[*callbacks, *extra], **kw)

    monkeypatch.setattr(dst, "train", stopped_train)
    assert run(tmp_path / "split") == 130
    assert run(tmp_path / "split") == 0
    (a,), (b,) = ((tmp_path / d).glob("dst-*/replicate-0/level-1/*") for d in ("whole", "split"))
    for name in ("weights_end.safetensors", "mask_end.safetensors"):
        ta, tb = load_file(str(a / name)), load_file(str(b / name))
        assert ta.keys() == tb.keys()
        for k in ta:
            assert torch.equal(ta[k], tb[k]), (name, k)
    ra, rb = (read_json(d / "result.json") for d in (a, b))
    assert ra["kernels"].startswith("sparse:") and ra["kernels"] == rb["kernels"]
    ra.pop("train_seconds"), rb.pop("train_seconds")
    assert ra == rb


# the knob ----------------------------------------------------------------------------------


def test_kernels_is_not_hashed_and_is_checked():
    base = spec_hash(identity(Spec(), 100))
    for kernels in ("dense", "sparse", "auto"):
        assert spec_hash(identity(Spec(kernels=kernels), 100)) == base
    with pytest.raises(UsageError, match="kernels"):
        Spec(kernels="csr")


def test_cli_kernels_flag(tmp_path):
    from ticketlab.cli import main
    from ticketlab.runs import read_csv

    common = ["--dataset", "xor", "--model", "mlp_16", "--steps", "4it", "--eval-every", "2it"]
    common += ["--batch-size", "16", "--runs-dir", str(tmp_path), "--quiet"]
    assert main(["lottery", *common, "--levels", "1", "--kernels", "sparse"]) == 0
    (run,) = tmp_path.glob("lottery-*")
    kernels = {int(r["level"]): r["kernels"] for r in read_csv(run / "results.csv")}
    assert kernels[0] == "dense"  # level 0 is dense: nothing to take
    assert kernels[1].startswith("sparse:")
    # the same directory whatever the kernels: asking again with others reuses it
    assert main(["lottery", *common, "--levels", "1", "--kernels", "dense"]) == 0
    assert [p.name for p in tmp_path.iterdir()] == [run.name]
    assert main(["lottery", *common, "--kernels", "csr"]) == 2


# the benchmark -----------------------------------------------------------------------------


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").exists(),
    reason="Fashion-MNIST (Debian dataset-fashion-mnist) not installed",
)
def test_imp_cost_benchmark_runs(capsys):
    """benchmarks/imp_cost.py still runs against the current API (tiny sizes, no time asserted)."""
    spec = importlib.util.spec_from_file_location(
        "imp_cost", Path(__file__).resolve().parents[1] / "benchmarks" / "imp_cost.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--steps 3 --rounds 1 --warmup 0 --levels 0,2 --threads 1"
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    assert re.search(r"ratio sparse level 2/dense level 0: -?[\d.]+", out)
    assert "auto took:" in out
