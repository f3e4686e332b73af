"""SupSup: earlier tasks keep their accuracy; the task id is inferred on an easy case."""

from __future__ import annotations

import pytest
import torch

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.data.tasks import make_task
from ticketlab.errors import UsageError
from ticketlab.methods.supsup import (
    SupsupExperiment,
    SupsupSpec,
    superfluous_objective,
)
from ticketlab.runs import read_csv


def easy(n, seed):
    """Class c lights up features 4c..4c+3 of 32; a permuted task moves them elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 32, generator=gen)
    x[:, :16] += 3.0 * torch.nn.functional.one_hot(y, 4).repeat_interleave(4, dim=1)
    return x, y


def easy_data():
    x, y = easy(2000, 0)
    xt, yt = easy(512, 1)
    return tl.data.from_tensors(x, y, xt, yt, val_size=200, name="easy")


def test_earlier_tasks_unchanged_and_inference(tmp_path):
    spec = SupsupSpec(
        model="mlp_128_128", tasks=3, steps="150it", eval_every="150it", optimizer="adam",
        lr=0.01, batch_size=100, runs_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    exp = SupsupExperiment(spec, data=easy_data())
    rows = exp.run()
    given = {
        (r["level"], r["eval_task"]): r["test_accuracy"]
        for r in rows
        if r["variant"] == "task-given"
    }
    assert given[(0, 0)] > 0.6  # chance is 0.25
    for level in (1, 2):
        assert given[(level, 0)] == given[(0, 0)]  # task 1 untouched by later tasks
    assert given[(2, 1)] == given[(1, 1)]
    inferred = [r for r in rows if r["variant"] == "task-inferred"]
    assert [r["level"] for r in inferred] == [0, 1, 2]
    assert inferred[-1]["inference_accuracy"] >= 0.9
    csv = read_csv(exp.dir / "results.csv")
    assert {"trained_task", "eval_task", "inference_accuracy"} <= set(csv[0])
    # rerunning reuses every finished task
    assert SupsupExperiment(spec, data=easy_data()).run() == rows
    # the report draws one line per task and one with the id inferred, from these rows
    from ticketlab.report import build_report, continual_section, load_runs

    build_report([exp.dir], tmp_path / "report")
    assert (tmp_path / "report" / "tasks.png").stat().st_size > 0
    tables = continual_section(load_runs([exp.dir]), tmp_path / "again").tables
    (table,) = [t for t in tables if t.caption.endswith("accuracy per task")]
    got = {(t, int(n)): float(acc) for t, n, _, acc, _, _ in table.rows}
    for (level, task), acc in given.items():
        assert got[(f"task {task}", level + 1)] == pytest.approx(100 * acc, abs=0.01)
    for r in inferred:
        assert got[("id inferred", r["level"] + 1)] == pytest.approx(
            100 * r["test_accuracy"], abs=0.01
        )


def test_split_tasks_and_bad_input(tmp_path):
    data = easy_data()
    task = make_task(data, "split", 1, 0)
    assert task.num_classes == 2 and set(task.y_test.tolist()) <= {0, 1}
    assert len(task.y_test) == int(((data.y_test == 2) | (data.y_test == 3)).sum())
    with pytest.raises(UsageError):
        SupsupExperiment(
            SupsupSpec(model="mlp_8", tasks=3, task_kind="split", runs_dir=str(tmp_path)), data=data
        )
    with pytest.raises(UsageError):
        SupsupSpec(task_kind="rotated")
    args = ["supsup", "--dataset", "xor", "--model", "mlp_8", "--steps", "5it", "--quiet"]
    assert main(args + ["--tasks", "0", "--runs-dir", str(tmp_path / "bad")]) == 2
    assert main(args + ["--model", "vgg11", "--runs-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def test_superfluous_objective_mirrors_the_training_gradient():
    """dG/dz is softmax on the s-neurons and 0 on the real ones: cross-entropy's gradient there."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 7, generator=gen, requires_grad=True)
    y = torch.randint(0, 3, (5,), generator=gen)
    (g,) = torch.autograd.grad(superfluous_objective(z, 3), z)
    (ce,) = torch.autograd.grad(torch.nn.functional.cross_entropy(z, y), z)
    assert torch.equal(g[:, :3], torch.zeros(5, 3))
    torch.testing.assert_close(g[:, 3:], ce[:, 3:])
    torch.testing.assert_close(g[:, 3:], z.detach().softmax(1)[:, 3:] / 5)
    with pytest.raises(UsageError):
        superfluous_objective(z, 7)  # no s-neurons


def test_superfluous_objective_infers_the_task(tmp_path):
    spec = SupsupSpec(
        model="mlp_128_128", tasks=3, steps="150it", eval_every="150it", optimizer="adam",
        lr=0.01, batch_size=100, runs_dir=str(tmp_path), quiet=True,
        inference_objective="superfluous", superfluous_neurons=12,
    )  # fmt: skip
    exp = SupsupExperiment(spec, data=easy_data())
    assert exp.model_fn(0).fc.out_features == 4 + 12
    rows = exp.run()
    given = [r for r in rows if r["variant"] == "task-given" and r["level"] == 2]
    assert min(r["test_accuracy"] for r in given) > 0.6  # chance is 0.25
    inferred = [r for r in rows if r["variant"] == "task-inferred"]
    assert inferred[-1]["inference_objective"] == "superfluous"
    assert inferred[-1]["inference_accuracy"] >= 0.9


def test_superfluous_objective_needs_superfluous_neurons(tmp_path):
    with pytest.raises(UsageError):
        SupsupSpec(inference_objective="superfluous")
    with pytest.raises(UsageError):
        SupsupSpec(inference_objective="energy")
    args = ["supsup", "--dataset", "xor", "--model", "mlp_8", "--steps", "5it", "--quiet"]
    bad = ["--runs-dir", str(tmp_path / "bad"), "--inference-objective", "superfluous"]
    assert main(args + bad) == 2
    assert main(args + bad + ["--superfluous-neurons", "-1"]) == 2
    assert not (tmp_path / "bad").exists()


def _two_task_net():
    """Task 0's mask keeps input 0 -> output 0, task 1's input 1 -> output 1: the input that
    is on says which mask gives a confident (low-entropy) output."""
    from ticketlab.masks import Mask
    from ticketlab.masks.forward import attach

    model = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(4.0)
    for p in model.parameters():
        p.requires_grad_(False)
    masks = [
        Mask({"0.weight": torch.tensor([[True, False], [False, False]])}),
        Mask({"0.weight": torch.tensor([[False, False], [False, True]])}),
    ]
    return model, attach(model), masks


def test_first_example_inference_ignores_the_rest_of_the_batch():
    """``examples="first"`` infers from example 0's logits only (the reference's
    ``logits[:data_to_repeat]`` with data_to_repeat 1); ``batch`` averages over all."""
    from ticketlab.masks import Mask
    from ticketlab.masks.forward import attach
    from ticketlab.methods.supsup import infer_task

    model, handle, masks = _two_task_net()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    assert infer_task(handle, model, masks, x) == 1  # the batch mean: three of four say 1
    assert infer_task(handle, model, masks, x, examples="batch") == 1
    assert infer_task(handle, model, masks, x, examples="first") == 0
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):  # whatever the other examples are
        other = x.clone()
        other[1:] = 3 * torch.rand(3, 2, generator=gen)
        assert infer_task(handle, model, masks, other, examples="first") == 0
    # the superfluous objective too: three outputs, the third an s-neuron
    model3 = torch.nn.Sequential(torch.nn.Linear(2, 3, bias=False))
    with torch.no_grad():
        model3[0].weight.copy_(torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]]))
    for p in model3.parameters():
        p.requires_grad_(False)
    handle3 = attach(model3)
    masks3 = [Mask({"0.weight": m}) for m in (torch.eye(3, 2).bool(), torch.eye(3, 2).bool())]
    masks3[0]["0.weight"][2, 0] = True  # task 0 pushes the s-neuron down on input 0
    masks3[1]["0.weight"][2, 1] = True
    for xs, want in ((x, 0), (x.flip(1), 1)):
        got = infer_task(handle3, model3, masks3, xs, "superfluous", 2, examples="first")
        assert got == want == infer_task(handle3, model3, masks3, xs[:1], "superfluous", 2)
        assert infer_task(handle3, model3, masks3, xs, "superfluous", 2) == 1 - want  # batch
    with pytest.raises(UsageError, match="batch, first"):
        infer_task(handle, model, masks, x, examples="last")


def test_inference_examples_spec_hash_and_cli(tmp_path, capsys):
    from ticketlab.spec import identity, spec_hash

    def h(**kw):
        return spec_hash(identity(SupsupSpec(**kw), 100))

    assert h() == h(inference_examples="batch") == "9a9c32c8a3e4"  # today's runs keep theirs
    assert h(inference_examples="first") != h()
    with pytest.raises(UsageError, match="batch, first"):
        SupsupSpec(inference_examples="one")
    args = ["supsup", "--dataset", "xor", "--model", "mlp_8", "--steps", "5it", "--quiet"]
    capsys.readouterr()
    bad = ["--runs-dir", str(tmp_path / "bad"), "--inference-examples", "one"]
    assert main(args + bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "batch, first" in err[0]
    assert not (tmp_path / "bad").exists()
    ok = ["--runs-dir", str(tmp_path / "ok"), "--tasks", "2", "--inference-examples", "first"]
    assert main(args + ok + ["--eval-every", "5it"]) == 0
    rows = read_csv(next((tmp_path / "ok").glob("supsup-*")) / "results.csv")
    inferred = [r for r in rows if r["variant"] == "task-inferred"]
    assert [r["inference_examples"] for r in inferred] == ["first", "first"]
