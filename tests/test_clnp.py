"""CLNP: earlier tasks unchanged bit for bit, the units each task frees and claims,
resume, and the fine-tuning baseline that forgets."""

from __future__ import annotations

import pytest
import torch

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.errors import RunInterrupted, UsageError
from ticketlab.methods import clnp as clnp_module
from ticketlab.methods.clnp import (
    ClnpExperiment,
    ClnpSpec,
    hidden_activations,
    prune_task,
    task_logits,
)
from ticketlab.runs import load_state, read_csv


def easy(n, seed):
    """Class c lights up features 4c..4c+3 of 32; a permuted task moves them elsewhere."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=gen)
    x = 0.3 * torch.randn(n, 32, generator=gen)
    x[:, :16] += 3.0 * torch.nn.functional.one_hot(y, 4).repeat_interleave(4, dim=1)
    return x, y


def easy_data():
    x, y = easy(1500, 0)
    xt, yt = easy(400, 1)
    return tl.data.from_tensors(x, y, xt, yt, val_size=200, name="easy")


def spec(tmp_path, **kw):
    base = dict(
        model="mlp_48_48", tasks=3, steps="100it", eval_every="100it", lr=0.01,
        batch_size=50, l1=1e-3, margin=0.02, runs_dir=str(tmp_path), quiet=True,
    )  # fmt: skip
    return ClnpSpec(**{**base, **kw})


def given(rows):
    return {(r["level"], r["eval_task"]): r["test_accuracy"] for r in rows}


def test_earlier_tasks_unchanged_bit_for_bit(tmp_path):
    exp = ClnpExperiment(spec(tmp_path), data=easy_data())
    rows = exp.run()
    acc = given(rows)
    assert acc[(0, 0)] > 0.6  # chance is 0.25
    assert acc[(1, 0)] == acc[(0, 0)] and acc[(2, 0)] == acc[(0, 0)]
    assert acc[(2, 1)] == acc[(1, 1)] and acc[(2, 2)] > 0.6
    tasks = exp.tasks()
    m0, heads0, used0 = exp.network(0, 0)
    m2, heads2, used2 = exp.network(0, 2)
    # the outputs of task 0 after task 2, bit for bit those after task 0
    x = tasks[0].x_test
    assert torch.equal(task_logits(m0, heads0, 0, x), task_logits(m2, heads2, 0, x))
    x = tasks[1].x_test
    m1, heads1, _ = exp.network(0, 1)
    assert torch.equal(task_logits(m1, heads1, 1, x), task_logits(m2, heads2, 1, x))
    # and the weights they read: task 0's units (rows and biases) and head, unchanged
    for i, (a, b) in enumerate(zip(m0.hidden, m2.hidden)):
        u = used0[i]
        assert torch.equal(a.weight[u], b.weight[u]) and torch.equal(a.bias[u], b.bias[u])
        assert bool((used0[i] <= used2[i]).all())  # used units stay used
    assert torch.equal(heads0[0]["weight"], heads2[0]["weight"])
    # the units task 1 and 2 trained moved (they are not the frozen ones)
    assert not torch.equal(m0.hidden[0].weight[~used0[0]], m2.hidden[0].weight[~used0[0]])
    # interference weights (free units of layer 0 into used units of layer 1) are zero
    w = m2.hidden[1].weight
    assert bool((w[used2[1]][:, ~used2[0]] == 0).all())


def test_finetune_baseline_forgets_and_clnp_hash_differs(tmp_path):
    ref = ClnpExperiment(spec(tmp_path), data=easy_data())
    exp = ClnpExperiment(spec(tmp_path, baseline="finetune"), data=easy_data())
    assert exp.dir != ref.dir
    rows = exp.run()
    acc = given(rows)
    assert {r["variant"] for r in rows} == {"finetune"}
    assert acc[(0, 0)] > 0.6
    # the shared body moves, so task 0's outputs change: plain fine-tuning interferes
    m0, h0, _ = exp.network(0, 0)
    m2, h2, _ = exp.network(0, 2)
    x = exp.tasks()[0].x_test
    assert not torch.equal(task_logits(m0, h0, 0, x), task_logits(m2, h2, 0, x))
    loss = {(r["level"], r["eval_task"]): r["test_loss"] for r in rows}
    assert loss[(2, 0)] != loss[(0, 0)]


def test_unit_accounting(tmp_path):
    exp = ClnpExperiment(spec(tmp_path), data=easy_data())
    rows = exp.run()
    csv = read_csv(exp.dir / "results.csv")
    assert {"units_claimed", "capacity_used", "units_per_layer", "eval_task"} <= set(csv[0])
    total = 48 + 48
    previous = [torch.zeros(48, dtype=torch.bool)] * 2
    for t in range(3):
        model, heads, used = exp.network(0, t)
        row = next(r for r in rows if r["level"] == t and r["eval_task"] == t)
        claimed = sum(int((u & ~p).sum()) for u, p in zip(used, previous))
        assert row["units_claimed"] == claimed
        assert row["capacity_used"] == pytest.approx(sum(int(u.sum()) for u in used) / total)
        assert row["units_per_layer"] == " ".join(f"{int(u.sum())}/48" for u in used)
        # a free unit is cut: no incoming weight, no bias, nothing read from it
        layers = [*model.hidden, model.fc]
        for i, u in enumerate(used):
            free = ~u
            assert bool((layers[i].weight[free] == 0).all())
            assert bool((layers[i].bias[free] == 0).all())
            assert bool((layers[i + 1].weight[:, free] == 0).all())
            for h in heads if i == len(used) - 1 else []:
                assert bool((h["weight"][:, free] == 0).all())
        previous = used
    assert rows[0]["units_claimed"] < total  # the first task left free units
    assert rows[0]["density"] < 1.0  # the pruned units' weights are zero
    # show prints the run (the training columns are on each task's own row only)
    assert main(["show", str(exp.dir)]) == 0


def test_prune_task_frees_what_the_task_does_not_need():
    """Unit 0 carries the class; units 1 (dead) and 2 (weak, unread by the head) do not:
    with no margin the two are freed and unit 0 kept."""
    x = torch.randn(200, 4)
    y = (x[:, 0] > 0).long()
    data = tl.data.from_tensors(x, y, x, y, val_size=100, name="toy")
    model = tl.models.build("mlp_3", (4,), 2, seed=0)
    with torch.no_grad():
        model.hidden[0].weight.zero_()
        model.hidden[0].bias.zero_()
        model.hidden[0].weight[0, 0] = 1.0
        model.hidden[0].bias[1] = -5.0  # never active
        model.hidden[0].bias[2] = 0.01  # weakly active, unread
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.weight[1, 0], model.fc.bias[0] = 10.0, 1e-3
    used = [torch.zeros(3, dtype=torch.bool)]
    with torch.no_grad():
        (act,) = hidden_activations(model, data.x_val)
    assert float(act[:, 1].max()) == 0.0
    kept, threshold, before, after = prune_task(model, used, data, 0.0, 1000)
    assert kept[0].tolist() == [True, False, False]
    assert after >= before and before > 0.9
    assert threshold >= 0.01
    assert model.hidden[0].bias[2].item() == 0.0 and model.fc.weight[1, 0].item() == 10.0


def test_resume_equals_uninterrupted(tmp_path, monkeypatch):
    ref_rows = ClnpExperiment(spec(tmp_path / "ref"), data=easy_data()).run()

    real = clnp_module.train
    fired = []

    class Stop:
        def __init__(self, label):
            self.label = label

        def after_step(self, step, *args):
            if "task 1" in self.label and step == 40 and not fired:
                fired.append(step)
                from ticketlab.train import request_stop

                request_stop()

    def train(*args, callbacks=(), label="", **kw):
        return real(*args, callbacks=[*callbacks, Stop(label)], label=label, **kw)

    monkeypatch.setattr(clnp_module, "train", train)
    cut = ClnpExperiment(spec(tmp_path / "cut"), data=easy_data())
    with pytest.raises(RunInterrupted):
        cut.run()
    assert (cut.dir / "replicate-0" / "level-1" / "train" / "checkpoint.safetensors").exists()
    assert not (cut.dir / "replicate-0" / "level-1" / "state.safetensors").exists()
    rows = ClnpExperiment(spec(tmp_path / "cut"), data=easy_data()).run()
    assert fired == [40]
    drop = ("train_seconds",)
    assert [{k: v for k, v in r.items() if k not in drop} for r in rows] == [
        {k: v for k, v in r.items() if k not in drop} for r in ref_rows
    ]
    ref_dir = next((tmp_path / "ref").iterdir())
    for t in range(3):
        a = load_state(ref_dir / "replicate-0" / f"level-{t}" / "state.safetensors")
        b = load_state(cut.dir / "replicate-0" / f"level-{t}" / "state.safetensors")
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_input(tmp_path, capsys):
    with pytest.raises(UsageError, match="choose from: finetune"):
        ClnpSpec(baseline="ewc")
    with pytest.raises(UsageError, match="margin"):
        ClnpSpec(margin=1.5)
    with pytest.raises(UsageError, match="fully connected"):
        ClnpExperiment(spec(tmp_path), data=easy_data(), model_fn=lambda s: torch.nn.Linear(32, 4))
    rc = main(["clnp", "--baseline", "nope", "--runs-dir", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "finetune" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_puts_clnp_beside_finetuning(tmp_path):
    from ticketlab.report import build_report, continual_section, load_runs

    runs = []
    for baseline in (None, "finetune"):
        exp = ClnpExperiment(spec(tmp_path / "runs", baseline=baseline), data=easy_data())
        rows = exp.run()
        runs.append((exp.dir, rows))
    build_report([d for d, _ in runs], tmp_path / "report")
    assert (tmp_path / "report" / "continual.png").stat().st_size > 0
    section = continual_section(load_runs([d for d, _ in runs]), tmp_path / "again")
    table = section.tables[0]
    assert table.caption.startswith("Continual learners")
    got = {(row[0], int(row[1])): row for row in table.rows}
    assert {name for name, _ in got} == {"CLNP", "fine-tuning"}
    for name, (_, rows) in zip(("CLNP", "fine-tuning"), runs):
        for level in range(3):
            accs = [r["test_accuracy"] for r in rows if r["level"] == level]
            assert len(accs) == level + 1
            assert float(got[(name, level + 1)][3]) == pytest.approx(
                100 * sum(accs) / len(accs), abs=0.01
            )
    clnp_rows = runs[0][1]
    used = next(r["capacity_used"] for r in clnp_rows if r["level"] == 2)
    assert float(got[("CLNP", 3)][6]) == pytest.approx(100 * used, abs=0.1)
    assert got[("fine-tuning", 3)][6] == ""
