"""``ticketlab early-bird`` end to end on a tiny BN model and tiny image data."""

import csv

import pytest
import torch

from ticketlab.cli import main
from ticketlab.masks import Mask
from ticketlab.methods.early_bird import bn_layers


@pytest.fixture
def tiny(tiny_images):
    return tiny_images


BASE = ["--model", "vgg11", "--width", "0.125", "--batch-size", "32", "--lr", "0.05"]
# the optimizer and init spelled out: the draws below do not move with the defaults
BASE += ["--optimizer", "sgd", "--momentum", "0.9", "--init", "kaiming_normal", "--quiet"]


def rows_of(runs):
    (path,) = runs.glob("early-bird-*/results.csv")
    return list(csv.DictReader(path.open()))


@pytest.mark.parametrize(
    "kind, start", [("channel", "draw"), ("weight", "init")], ids=["channel", "weight"]
)
def test_draw_prune_retrain(tiny, tmp_path, kind, start):
    args = ["early-bird", *BASE, "--steps", "12ep", "--eval-every", "4ep", "--mask-kind", kind]
    args += ["--retrain-from", start, "--runs-dir", str(tmp_path)]
    assert main(args) == 0
    search, ticket = rows_of(tmp_path)
    assert (search["variant"], ticket["variant"]) == ("search", "ticket")
    assert search["ticket_drawn"] == ticket["ticket_drawn"] == "True"
    epoch = int(ticket["draw_epoch"])
    assert 5 <= epoch <= 12  # the FIFO needs 5 masks
    assert int(search["steps"]) == epoch * 7  # 224 examples / 32: the search ends at the draw
    assert ticket["retrain"] == "continue" and epoch < 12
    assert int(ticket["steps"]) == 12 * 7 - epoch * 7  # the rest of the one budget
    assert ticket["retrain_from"] == start and float(ticket["density"]) < 1
    assert float(search["max_distance"]) <= 0.1
    assert 0 < float(ticket["flops_saved_vs_lottery"]) < 1
    assert float(ticket["train_flops"]) > float(search["train_flops"])
    tdir = next(tmp_path.glob("early-bird-*/replicate-0/level-1/ticket"))
    mask = Mask.load(tdir / "mask.safetensors")
    if kind == "weight":
        assert abs(mask.density() - float(ticket["density"])) < 1e-4
    else:  # whole channels removed: a physically smaller VGG
        from safetensors.torch import load_file

        from ticketlab.models import build
        from ticketlab.pruning.structured import expand

        assert ticket["removed_units"] == "True"
        w = load_file(str(tdir / "weights_end.safetensors"))
        model = build("vgg11", (1, 12, 12), 2, 0.125)
        keep = {}
        for name in bn_layers(model):
            conv = f"features.{int(name.split('.')[1]) - 1}.weight"
            rows = mask[conv].flatten(1).any(1)
            assert w[f"{name}.weight"].shape == (int(rows.sum()),)
            assert w[conv].shape[0] == int(rows.sum())
            keep[conv] = rows
        assert not all(m.all() for m in keep.values())
        # its weights are those the unit masks leave: rows and the next layer's inputs
        removed = expand(model, keep)
        assert abs(removed.density() - float(ticket["density"])) < 1e-4
        assert removed.density() < mask.density()
        assert sum(v.numel() for k, v in w.items() if k in removed.names()) == removed.num_kept()


def test_no_draw_exits_zero(tiny, tmp_path, capsys):
    args = ["early-bird", *BASE, "--steps", "2ep", "--eval-every", "2ep"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no ticket drawn" in err[0]
    (row,) = rows_of(tmp_path)
    assert row["ticket_drawn"] == "False" and row["draw_epoch"] == ""
    assert row["test_accuracy"] != "" and float(row["flops_saved_vs_lottery"]) > 0


def test_bad_input(tiny, tmp_path):
    base = ["early-bird", *BASE, "--runs-dir", str(tmp_path)]
    assert main([*base, "--ratio", "1.5"]) == 2
    assert main([*base, "--retrain-from", "rewind"]) == 2
    assert main([*base, "--retrain", "rewind"]) == 2
    assert main([*base, "--mask-kind", "filter"]) == 2
    assert main([*base, "--l1", "-1"]) == 2
    assert main([*base, "--model", "lenet_300_100"]) == 2  # no BatchNorm
    assert not list(tmp_path.iterdir())


def test_interrupted_search_and_ticket_resume_bit_identical(tiny, tmp_path, monkeypatch):
    """Cut once inside the search, one epoch before the draw (the watch holds 4 of the 5
    masks of the draw then), and once inside the retraining: each part resumes from its
    checkpoint and ends as an uninterrupted run."""
    import json

    from safetensors.torch import load_file

    from ticketlab.methods import early_bird
    from ticketlab.train import request_stop

    args = ["early-bird", *BASE, "--steps", "8ep", "--eval-every", "2ep", "--distance", "0.2"]
    assert main([*args, "--runs-dir", str(tmp_path / "whole")]) == 0

    real, starts, stops = early_bird.train, [], {"search": 32, "ticket": 49}

    class Stop:  # 7 steps an epoch, evaluations every 14: 32 and 49 are between them
        def __init__(self, label):
            self.label, self.first = label, None

        def after_step(self, step, *rest):
            if self.first is None:
                self.first = step
                starts.append(("search" if "search" in self.label else "ticket", step))
            for part, at in list(stops.items()):
                if part in self.label and step + 1 == at:
                    del stops[part]
                    request_stop()

    def train(*a, callbacks=(), label="", **kw):
        return real(*a, callbacks=[*callbacks, Stop(label)], label=label, **kw)

    monkeypatch.setattr(early_bird, "train", train)
    split = ["--runs-dir", str(tmp_path / "split")]
    assert main([*args, *split]) == 130
    assert main([*args, *split]) == 130
    assert main([*args, *split]) == 0
    # the ticket continues the budget from the draw at epoch 6 (step 42 of 56)
    assert starts == [("search", 0), ("search", 32), ("ticket", 42), ("ticket", 49)]
    (a,), (b,) = (list((tmp_path / d).glob("early-bird-*")) for d in ("whole", "split"))
    names = sorted(p.relative_to(a) for p in a.rglob("*.safetensors"))
    assert names == sorted(p.relative_to(b) for p in b.rglob("*.safetensors"))
    assert len(names) == 6  # search: channels, mask, weights at the draw; ticket: 3
    for n in names:
        wa, wb = load_file(str(a / n)), load_file(str(b / n))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), n
    for n in ("replicate-0/level-0/search", "replicate-0/level-1/ticket"):
        ra, rb = (json.loads((d / n / "result.json").read_text()) for d in (a, b))
        ra.pop("train_seconds", None), rb.pop("train_seconds", None)
        assert ra == rb, n
    assert ra["draw_epoch"] == 6  # a queue lost at step 32 could not draw before epoch 9
    assert rows_of(tmp_path / "whole") == [
        {**r, "train_seconds": w["train_seconds"]}
        for r, w in zip(rows_of(tmp_path / "split"), rows_of(tmp_path / "whole"))
    ]


class Probe:
    """Ticket-phase probe: ``first`` (put before the method's callbacks) keeps the BN
    scales' gradients before any penalty; ``last`` (after them) the gradients the
    optimizer gets, the step indices and the learning rate of each step."""

    def __init__(self):
        self.steps, self.lrs, self.raw, self.penalised, self.gammas = [], [], None, None, None

    def grads(self, model):
        return {n: bn.weight.grad.clone() for n, bn in bn_layers(model).items()}

    @property
    def first(self):
        probe = self

        class First:
            def before_step(self, step, model, optimizer):
                if probe.raw is None:
                    probe.raw = probe.grads(model)
                    probe.gammas = {
                        n: bn.weight.detach().clone() for n, bn in bn_layers(model).items()
                    }

        return First()

    @property
    def last(self):
        probe = self

        class Last:
            def before_step(self, step, model, optimizer):
                if probe.penalised is None:
                    probe.penalised = probe.grads(model)
                probe.steps.append(step)
                probe.lrs.append(optimizer.param_groups[0]["lr"])

        return Last()


@pytest.mark.parametrize("mode", ["continue", "restart"])
def test_retraining_continues_the_budget_or_restarts(tiny, tmp_path, monkeypatch, mode):
    """continue: the ticket trains steps [t, T) of the one budget, at the schedule's LR from
    step t on, with the L1 subgradient on the BN scales; restart: [0, T), the schedule
    from its start, no L1. ``train_flops`` counts the steps each one took."""
    from ticketlab.methods import early_bird

    real, probe = early_bird.train, Probe()

    def train(*a, callbacks=(), label="", **kw):
        if "ticket" in label:
            callbacks = [probe.first, *callbacks, probe.last]
        return real(*a, callbacks=callbacks, label=label, **kw)

    monkeypatch.setattr(early_bird, "train", train)
    args = ["early-bird", *BASE, "--steps", "10ep", "--eval-every", "10ep", "--distance", "0.2"]
    args += ["--schedule", "step", "--milestones", "2ep", "--gamma", "0.1", "--l1", "0.01"]
    if mode == "restart":
        args += ["--retrain", "restart"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    search, ticket = rows_of(tmp_path)
    t, total = int(search["steps"]), 10 * 7
    assert int(ticket["draw_epoch"]) * 7 == t and 2 * 7 < t < total
    assert ticket["retrain"] == mode and ticket["removed_units"] == "True"
    start = t if mode == "continue" else 0
    assert probe.steps == list(range(start, total))
    assert int(ticket["steps"]) == total - start and int(ticket["retrain_start"]) == start
    # the schedule's LR at each step: 0.05, x 0.1 from step 14 (the milestone) on
    assert probe.lrs == [pytest.approx(0.05 * (0.1 if s >= 14 else 1.0)) for s in probe.steps]
    assert probe.lrs[0] == pytest.approx(0.005 if mode == "continue" else 0.05)
    l1 = 0.01 if mode == "continue" else 0.0
    for n, g in probe.penalised.items():
        expected = probe.raw[n] + l1 * torch.sign(probe.gammas[n])
        assert torch.allclose(g, expected, atol=1e-7), n
    assert any(bool((probe.gammas[n] != 0).any()) for n in probe.gammas)
    # FLOPs: t dense search steps, then the ticket's own steps at its own size
    retrain = 3.0 * float(ticket["macs"]) * (total - start) * 32
    spent = float(search["train_flops"]) + retrain  # the CSV keeps 6 digits
    assert float(ticket["train_flops"]) == pytest.approx(spent, rel=1e-5)
    saved = 1 - spent / float(ticket["lottery_train_flops"])
    assert float(ticket["flops_saved_vs_lottery"]) == pytest.approx(saved, rel=1e-5)


def test_ticket_drawn_at_the_end_of_the_budget(tiny, tmp_path):
    """Drawn at the last epoch, a continued ticket has no step left: it is evaluated as
    drawn and costs nothing beyond the search."""
    args = ["early-bird", *BASE, "--steps", "6ep", "--eval-every", "2ep", "--distance", "0.2"]
    assert main([*args, "--runs-dir", str(tmp_path)]) == 0
    search, ticket = rows_of(tmp_path)
    assert int(ticket["draw_epoch"]) == 6 and int(search["steps"]) == 42
    assert int(ticket["steps"]) == 0 and int(ticket["retrain_start"]) == 42
    assert 0 <= float(ticket["test_accuracy"]) <= 1 and ticket["train_accuracy"] != ""
    assert float(ticket["train_flops"]) == pytest.approx(float(search["train_flops"]))
    tdir = next(tmp_path.glob("early-bird-*/replicate-0/level-1/ticket"))
    from safetensors.torch import load_file

    a, b = (load_file(str(tdir / f"weights_{w}.safetensors")) for w in ("start", "end"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_run_made_before_retrain_existed_is_refused(tiny, tmp_path, capsys):
    """A run directory written before ``retrain`` existed has the same hash, but its
    tickets were retrained as ``restart``: the new default does not extend it."""
    import json

    args = ["early-bird", *BASE, "--steps", "2ep", "--eval-every", "2ep"]
    args += ["--runs-dir", str(tmp_path)]
    assert main(args) == 0
    (run,) = tmp_path.glob("early-bird-*")
    stored = json.loads((run / "spec.json").read_text())
    del stored["spec"]["retrain"]
    (run / "spec.json").write_text(json.dumps(stored))
    capsys.readouterr()
    assert main(args) == 2
    assert "before --retrain existed" in capsys.readouterr().err
    assert main([*args, "--retrain", "restart"]) == 0  # a run of its own
    assert len(list(tmp_path.glob("early-bird-*"))) == 2
