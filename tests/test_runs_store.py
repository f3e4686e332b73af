"""The compact run store, checkpoint timing, and interop with torch.nn.utils.prune."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

import ticketlab as tl
from ticketlab.cli import main
from ticketlab.errors import UsageError
from ticketlab.masks.interop import (
    apply_mask,
    from_torch_prune,
    to_torch_prune,
    torch_prune_state,
)
from ticketlab.methods.lottery import LotteryExperiment
from ticketlab.runs import file_bytes, file_layout, load_state, read_state_file, save_state

ROOT = Path(__file__).resolve().parents[1]
FASHION = Path("/usr/share/datasets/fashion-mnist")
TRAIN = sys.modules["ticketlab.train"]  # the module (``tl.train`` is the function)


def bits(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as integers, so -0.0, NaN payloads and denormals compare exactly."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return t.contiguous().view(ints[t.element_size()])


def same_bits(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype
        and a[k].shape == b[k].shape
        and torch.equal(bits(a[k]), bits(b[k]))
        for k in a
    )


def assert_same_weights(a: dict, b: dict, mask, tmp_path) -> None:
    """Equal weights, every kept one and every unmasked tensor bit for bit, and the same
    weights file. (A pruned weight is +0.0 or -0.0, as ``w * 0`` leaves it; one restored
    from a compact checkpoint comes back +0.0: the same value, and the same file.)"""
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
        keep = mask[k] if k in mask else torch.ones_like(a[k], dtype=torch.bool)
        assert torch.equal(bits(a[k][keep]), bits(b[k][keep])), k
    save_state(tmp_path / "a.safetensors", a, mask)
    save_state(tmp_path / "b.safetensors", b, mask)
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def lenet(seed=0):
    return tl.models.build("lenet_300_100", (1, 28, 28), 10, init="xavier_normal", seed=seed)


def sparse_mask(model, fraction: float, levels: int) -> tl.Mask:
    mask = tl.Mask.dense(model)
    for _ in range(levels):
        mask = tl.prune(model, mask, fraction, scope="global")
    return mask


@pytest.fixture(scope="module")
def xor():
    return tl.data.load("xor")


# 1. compact files ---------------------------------------------------------------------------


def test_compact_file_round_trips_bit_for_bit(tmp_path):
    g = torch.Generator().manual_seed(0)
    state, masks = {}, {}
    for name, dtype, shape, density in [
        ("a.weight", torch.float32, (300, 784), 0.02),  # csr
        ("b.weight", torch.float32, (64, 100), 0.5),  # bitmask
        ("c.weight", torch.float16, (40, 70), 0.1),
        ("d.weight", torch.bfloat16, (3, 5, 7, 9), 0.05),
        ("e.weight", torch.float64, (128,), 0.3),
        ("f.weight", torch.float32, (8, 40000), 0.01),  # long rows: int32 column indices
    ]:
        keep = torch.rand(shape, generator=g) < density
        w = torch.randn(shape, generator=g).to(dtype)
        flat = w.view(-1)
        # values a numeric copy could spoil, at kept places
        kept = keep.view(-1).nonzero()[:4, 0]
        flat[kept] = torch.tensor([-0.0, float("nan"), float("-inf"), 1e-40]).to(dtype)
        state[name] = w.masked_fill(~keep, 0.0)
        masks[name] = keep
    state["a.bias"] = torch.randn(300, generator=g)
    state["e.count"] = torch.arange(128)  # not in the mask: stored as it is
    state["flag"] = torch.tensor(True)
    mask = tl.Mask(masks)
    save_state(tmp_path / "w.safetensors", state, mask)
    back = load_state(tmp_path / "w.safetensors")
    assert same_bits(back, state)  # order and bits
    # both compact encodings are in use and every masked tensor is compact
    _, metadata = read_state_file(tmp_path / "w.safetensors")
    layout = file_layout(metadata)["tensors"]
    assert set(layout) == set(masks)
    assert {v["encoding"] for v in layout.values()} == {"csr", "bitmask"}
    assert {load_file(str(tmp_path / "w.safetensors"))["f.weight::indices"].dtype} == {torch.int32}
    # writing it again gives the same bytes (no order left to chance)
    save_state(tmp_path / "again.safetensors", back, mask)
    a, b = (Path(tmp_path / n).read_bytes() for n in ("w.safetensors", "again.safetensors"))
    assert a == b


def test_pruned_places_read_back_as_zero_and_without_a_mask_nothing_changes(tmp_path):
    model = lenet()
    mask = sparse_mask(model, 0.5, 3)
    mask.apply_(model)  # pruned weights become +0.0 or -0.0 (w * 0)
    state = tl.snapshot(model)
    assert any(bool((v.signbit() & (v == 0)).any()) for v in state.values())
    save_state(tmp_path / "m.safetensors", state, mask)
    back = load_state(tmp_path / "m.safetensors")
    for k, v in state.items():
        assert torch.equal(back[k], v), k  # equal values
        if k in mask:
            assert torch.equal(bits(back[k][mask[k]]), bits(v[mask[k]])), k  # kept: exact
            assert not bool(back[k][~mask[k]].signbit().any()), k  # pruned: +0.0
    # without a mask the file is plain safetensors, bit for bit
    save_state(tmp_path / "plain.safetensors", state)
    plain = load_file(str(tmp_path / "plain.safetensors"))
    assert same_bits({k: plain[k] for k in state}, state)
    assert (
        file_bytes(tmp_path / "plain.safetensors")[0]
        == file_bytes(tmp_path / "plain.safetensors")[1]
    )


def test_98_percent_lenet_ticket_weights_take_a_twentieth(tmp_path):
    model = lenet()
    mask = sparse_mask(model, 0.2, 18)  # 0.8^18: 1.8% kept
    assert mask.density() <= 0.02
    mask.apply_(model)
    save_state(tmp_path / "compact.safetensors", tl.snapshot(model), mask)
    save_state(tmp_path / "dense.safetensors", tl.snapshot(model))
    compact = (tmp_path / "compact.safetensors").stat().st_size
    dense = (tmp_path / "dense.safetensors").stat().st_size
    assert compact * 20 <= dense, (compact, dense)
    # the dense-equivalent size is worked out from the header exactly
    assert file_bytes(tmp_path / "compact.safetensors") == (compact, dense)


def test_old_format_files_load(tmp_path):
    model = lenet()
    mask = sparse_mask(model, 0.5, 4)
    mask.apply_(model)
    state = tl.snapshot(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "old.safetensors"))
    assert same_bits(dict(sorted(load_state(tmp_path / "old.safetensors").items())),
                     dict(sorted(state.items())))  # fmt: skip
    # a checkpoint as it was written before: plain model tensors, one metadata entry
    opt = TRAIN.make_optimizer(model, tl.Spec())
    extra_in = {"train_seconds": 1.0}  # what the loop stores beside the tensors
    TRAIN.save_checkpoint(tmp_path / "ckpt.safetensors", model, opt, 7, extra_in)
    assert not file_layout(read_state_file(tmp_path / "ckpt.safetensors")[1])
    fresh = lenet(seed=3)
    step, extra = TRAIN.load_checkpoint(
        tmp_path / "ckpt.safetensors", fresh, TRAIN.make_optimizer(fresh, tl.Spec())
    )
    assert step == 7 and extra == extra_in
    assert same_bits(tl.snapshot(fresh), state)


def test_masks_are_bit_packed_and_old_mask_files_load(tmp_path):
    model = lenet()
    dense = tl.Mask.dense(model)
    sparse = sparse_mask(model, 0.2, 18)
    for mask, most in ((dense, 1 / 7), (sparse, 1 / 20)):  # bits; CSR indices
        mask.save(tmp_path / "m.safetensors")
        size, full = file_bytes(tmp_path / "m.safetensors")
        assert size <= most * full, (size, full)
        back = tl.Mask.load(tmp_path / "m.safetensors")
        assert back == mask and back.names() == mask.names()
    # as masks were written before: uint8, the layer order in the metadata
    tensors = {k: m.to(torch.uint8) for k, m in sparse.items()}
    order = {"order": json.dumps(sparse.names())}
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=order)
    back = tl.Mask.load(tmp_path / "old.safetensors")
    assert back == sparse and back.names() == sparse.names()


def test_corrupt_compact_file_is_a_data_error(tmp_path):
    model = lenet()
    mask = sparse_mask(model, 0.5, 5)
    mask.apply_(model)
    save_state(tmp_path / "w.safetensors", tl.snapshot(model), mask)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("::values"))
    tensors[key] = tensors[key][:-1]  # one value short
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(tl.DataError, match="corrupt"):
        load_state(tmp_path / "bad.safetensors")


# 2. runs: compact weights, old runs resume, show --disk ------------------------------------


def _xor_spec(tmp_path, **kw):
    base = dict(
        dataset="xor",
        model="mlp_32_32",
        steps="60it",
        batch_size=16,
        eval_every="10it",
        optimizer="adam",
        lr=0.01,
        prune_fraction=0.6,
        output_prune_fraction=0.6,
        levels=3,
        quiet=True,
        runs_dir=str(tmp_path),
    )
    base.update(kw)
    return tl.Spec(**base)


def _to_old_format(run_dir: Path) -> int:
    """Rewrite every compact file of a run as the plain files written before."""
    n = 0
    for path in run_dir.rglob("*.safetensors"):
        state, metadata = read_state_file(path)
        if not file_layout(metadata):
            continue
        meta = json.loads(metadata["ticketlab"])
        meta.pop("compact")
        kept = {"ticketlab": json.dumps(meta)} if meta else None
        if path.name.startswith("mask"):  # masks: one byte per entry, the order beside
            state = {k: v.to(torch.uint8) for k, v in state.items()}
            kept = {"order": json.dumps(list(state))}
        save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=kept)
        n += 1
    return n


def _interrupt_at(monkeypatch, at_call: int, at_step: int):
    """Make the ``at_call``-th training of the next run stop (as SIGTERM does) after
    ``at_step`` steps of it."""
    import ticketlab.experiment as experiment_mod

    real_train, calls = experiment_mod.train, []

    class Stop:
        def after_step(self, step, *args):
            if len(calls) == at_call and step + 1 == at_step:
                TRAIN.request_stop()

    def train(*args, callbacks=(), **kw):
        calls.append(1)
        return real_train(*args, callbacks=[*callbacks, Stop()], **kw)

    monkeypatch.setattr(experiment_mod, "train", train)


def test_an_old_format_run_resumes_bit_identical(tmp_path, monkeypatch):
    ref = LotteryExperiment(_xor_spec(tmp_path / "ref"))
    ref.run()
    cut = LotteryExperiment(_xor_spec(tmp_path / "cut"))
    with monkeypatch.context() as m:
        _interrupt_at(m, 3, 25)  # level 2, halfway
        with pytest.raises(tl.RunInterrupted):
            cut.run()
    vdir = cut.dir / "replicate-0" / "level-2" / "ticket"
    assert (vdir / "checkpoint.safetensors").exists() and not (vdir / "result.json").exists()
    assert _to_old_format(cut.dir) >= 7  # masks, weights of levels 1-2, the checkpoint
    LotteryExperiment(_xor_spec(tmp_path / "cut")).run()
    ends = sorted(p.relative_to(ref.dir) for p in ref.dir.rglob("weights_end.safetensors"))
    assert len(ends) == 4
    for rel in ends:
        a, b = (dict(sorted(load_state(d / rel).items())) for d in (ref.dir, cut.dir))
        assert same_bits(a, b), rel
        if "level-2" in str(rel) or "level-3" in str(rel):  # written after the resume
            a, b = (ref.dir / rel).read_bytes(), (cut.dir / rel).read_bytes()
            assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), rel
    # weights files of the pruned levels are compact, and read back like the others
    end = ref.dir / "replicate-0" / "level-3" / "ticket" / "weights_end.safetensors"
    assert file_layout(read_state_file(end)[1])
    size, dense = file_bytes(end)
    assert size < dense / 2


def test_show_disk_prints_bytes_per_level(tmp_path, capsys):
    exp = LotteryExperiment(_xor_spec(tmp_path))
    exp.run()
    capsys.readouterr()
    assert main(["show", str(exp.dir), "--disk"]) == 0
    out = capsys.readouterr().out
    for level in ("0", "1", "2", "3", "shared", "total"):
        assert any(line.split("│")[1].strip() == level for line in out.splitlines() if "│" in line)
    assert "dense" in out
    assert main(["show", str(tmp_path), "--disk"]) == 2  # not a run directory


# 3. checkpoints on their own interval ------------------------------------------------------


class Crash(Exception):
    pass


class CrashAt:
    """Raise after ``at`` steps, as a kill -9 would stop the run: no checkpoint then."""

    def __init__(self, at):
        self.at = at

    def after_step(self, step, *args):
        if step + 1 == self.at:
            raise Crash


def _steps_checkpointed(monkeypatch) -> list[int]:
    written = []
    real = TRAIN.save_checkpoint

    def save(path, model, optimizer, step, *args, **kw):
        written.append(step)
        return real(path, model, optimizer, step, *args, **kw)

    monkeypatch.setattr(TRAIN, "save_checkpoint", save)
    return written


def _metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_checkpoints_at_their_interval_and_a_resume_equals_the_whole_run(
    tmp_path, xor, monkeypatch
):
    spec = tl.Spec(
        steps="120it",
        batch_size=50,
        optimizer="adam",
        lr=0.01,
        eval_every="10it",
        checkpoint_every="50it",
        checkpoint_seconds=0,
    )
    model0 = tl.models.build("mlp_32", (2,), 2, seed=0)
    mask = tl.prune(model0, tl.Mask.dense(model0), fraction=0.9)
    written = _steps_checkpointed(monkeypatch)

    whole = tl.models.build("mlp_32", (2,), 2, seed=0)
    tl.train(whole, xor, spec, mask=mask, workdir=tmp_path / "whole")
    assert written == [50, 100]  # not at every evaluation, and none at the end
    assert [r["step"] for r in _metrics(tmp_path / "whole" / "metrics.jsonl")] == list(
        range(0, 121, 10)
    )

    written.clear()
    part = tl.models.build("mlp_32", (2,), 2, seed=0)
    with pytest.raises(Crash):
        tl.train(part, xor, spec, mask=mask, workdir=tmp_path / "part", callbacks=[CrashAt(73)])
    assert written == [50]
    ckpt = tmp_path / "part" / "checkpoint.safetensors"
    assert file_layout(read_state_file(ckpt)[1])  # the model's pruned weights: compact
    resumed = tl.models.build("mlp_32", (2,), 2, seed=5)  # all from the checkpoint
    tl.train(resumed, xor, spec, mask=mask, workdir=tmp_path / "part")
    assert written == [50, 100]  # resumed from 50
    assert_same_weights(tl.snapshot(resumed), tl.snapshot(whole), mask, tmp_path)
    assert _metrics(tmp_path / "part" / "metrics.jsonl") == _metrics(
        tmp_path / "whole" / "metrics.jsonl"
    )


def test_a_stop_request_still_checkpoints_and_the_clock_can_too(tmp_path, xor, monkeypatch):
    spec = tl.Spec(steps="40it", batch_size=50, eval_every="10it", checkpoint_every="1000it")
    written = _steps_checkpointed(monkeypatch)

    class StopAt:
        def after_step(self, step, *args):
            if step + 1 == 33:
                TRAIN.request_stop()

    model = tl.models.build("mlp_32", (2,), 2, seed=0)
    with pytest.raises(tl.RunInterrupted):
        tl.train(model, xor, spec, workdir=tmp_path / "a", callbacks=[StopAt()])
    assert written == [33]
    written.clear()
    # every step is past a clock of a nanosecond: a checkpoint after each but the last
    tl.train(model, xor, spec.replace(checkpoint_seconds=1e-9), workdir=tmp_path / "b")
    assert written == list(range(1, 40))


def test_checkpoint_knobs_leave_the_hash_alone_and_come_from_the_command_line(tmp_path):
    from ticketlab.cli import build_parser
    from ticketlab.cli.common import spec_from_args
    from ticketlab.spec import identity, spec_hash

    base = tl.Spec(method="lottery", dataset="xor", model="mlp")
    other = base.replace(checkpoint_every="7it", checkpoint_seconds=5.0)
    assert spec_hash(identity(other, 100)) == spec_hash(identity(base, 100)) == "90983947f4c5"
    flags = {"--checkpoint-every": "2ep", "--checkpoint-seconds": "0"}
    args = build_parser().parse_args(["lottery", *(x for kv in flags.items() for x in kv)])
    spec = spec_from_args(args, "lottery")
    # the flags land in their fields, and nothing else changes
    expected = tl.Spec(method="lottery", checkpoint_every="2ep", checkpoint_seconds=0.0)
    assert spec == expected
    assert tl.spec.resolve(spec, 100).checkpoint_every == 200
    for bad in (["--checkpoint-every", "0it"], ["--checkpoint-seconds", "-1"]):
        rc = main(["lottery", "--dataset", "xor", "--runs-dir", str(tmp_path), *bad, "--quiet"])
        assert rc == 2
    assert not list(tmp_path.iterdir())


# 4. torch.nn.utils.prune and a user's own module -------------------------------------------


class Net(nn.Module):
    def __init__(self, hidden=32):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(20, hidden), nn.ReLU(), nn.Linear(hidden, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(x).relu())


def test_interop_round_trip_with_torch_prune():
    torch.manual_seed(0)
    net = Net()
    x = torch.randn(64, 20)
    mask = tl.prune(net, tl.Mask.dense(net), fraction=0.7)
    ticket = copy.deepcopy(net)
    mask.apply_(ticket)  # ticketlab's masked model
    weights = tl.snapshot(ticket)

    # ticketlab -> torch.nn.utils.prune: the pruned module computes the same outputs
    pruned = to_torch_prune(Net(), mask, weights)
    assert hasattr(pruned.head, "weight_orig") and hasattr(pruned.head, "weight_mask")
    assert torch.equal(pruned(x), ticket(x))
    # ... and reads back as the same mask and weights
    back_mask, back_weights = from_torch_prune(pruned)
    assert back_mask == mask and sorted(back_weights) == sorted(weights)
    for k, v in weights.items():
        assert torch.equal(back_weights[k], v), k
    # its state dict form loads into a module pruned by the same mask
    state = torch_prune_state(mask, weights)
    assert state.keys() == pruned.state_dict().keys()
    again = to_torch_prune(Net(hidden=32), mask)
    again.load_state_dict(state)
    assert torch.equal(again(x), ticket(x))

    # torch.nn.utils.prune -> ticketlab: a module pruned the torch way
    theirs = copy.deepcopy(net)
    params = [(theirs.body[0], "weight"), (theirs.body[2], "weight"), (theirs.head, "weight")]
    torch_prune.global_unstructured(params, pruning_method=torch_prune.L1Unstructured, amount=0.6)
    torch_prune.l1_unstructured(theirs.head, "weight", amount=0.3)  # pruned twice: combined
    m, w = from_torch_prune(theirs.state_dict())
    ours = Net()
    ours.load_state_dict(w)
    assert torch.equal(ours(x), theirs(x))
    assert m.num_kept() == sum(int(mod.weight_mask.sum()) for mod, _ in params)
    # the mask keeps it pruned through ticketlab's training
    data = tl.data.from_tensors(x, torch.randint(0, 4, (64,)), x[:8], torch.zeros(8).long())
    tl.train(ours, data, tl.Spec(steps="5it", batch_size=16, eval_every="5it"), mask=m)
    for name, keep in m.items():
        assert int(torch.count_nonzero(dict(ours.named_parameters())[name][~keep])) == 0


def test_a_saved_mask_applies_to_a_users_module_by_name(tmp_path):
    torch.manual_seed(0)
    net = Net()
    mask = tl.prune(net, tl.Mask.dense(net), fraction=0.5)
    mask.save(tmp_path / "mask.safetensors")
    theirs = Net()
    got = apply_mask(theirs, tmp_path / "mask.safetensors")
    assert got == mask
    for name, keep in mask.items():
        w = dict(theirs.named_parameters())[name]
        assert int(torch.count_nonzero(w[~keep])) == 0 and bool((w[keep] != 0).all())
    # other names, mapped
    seq = nn.Sequential(
        nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4)
    )
    rename = {"body.0.weight": "0.weight", "body.2.weight": "2.weight", "head.weight": "4.weight"}
    renamed = apply_mask(seq, mask, rename=rename)
    assert renamed.names() == ["0.weight", "2.weight", "4.weight"]
    assert int(torch.count_nonzero(seq[4].weight)) == mask.num_kept() - sum(
        int(mask[n].sum()) for n in ("body.0.weight", "body.2.weight")
    )


def test_a_mask_that_does_not_fit_is_refused_in_one_line(tmp_path):
    net = Net()
    mask = tl.Mask.dense(net)
    narrow = Net(hidden=24)
    before = tl.snapshot(narrow)
    with pytest.raises(UsageError) as err:
        apply_mask(narrow, mask)
    message = str(err.value)
    assert "\n" not in message
    assert "'body.0.weight' is (24, 20) but the mask's 'body.0.weight' is (32, 20)" in message
    assert "body.2.weight" in message and "head.weight" not in message
    assert same_bits(tl.snapshot(narrow), before)  # nothing changed
    with pytest.raises(UsageError, match="'fc.weight' is not a parameter"):
        apply_mask(nn.Sequential(nn.Linear(20, 4)), tl.Mask({"fc.weight": torch.ones(4, 20)}))
    with pytest.raises(UsageError, match="is not a parameter"):
        to_torch_prune(Net(hidden=24), tl.Mask({"x.weight": torch.ones(2, 2)}))
    with pytest.raises(UsageError, match="does not fit"):
        to_torch_prune(Net(hidden=24), mask)
    with pytest.raises(UsageError, match="nothing pruned"):
        from_torch_prune(Net())


# 5. the end-to-end benchmark still runs ----------------------------------------------------


@pytest.mark.skipif(not FASHION.exists(), reason="Fashion-MNIST not installed")
def test_imp_end_to_end_benchmark_runs(capsys):
    spec = importlib.util.spec_from_file_location(
        "imp_end_to_end", ROOT / "benchmarks" / "imp_end_to_end.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    args = "--steps 20 --levels 1 --rounds 1 --eval-every 10it --checkpoint-every 10it"
    assert bench.main(args.split()) == 0
    out = capsys.readouterr().out
    assert "ratio ticketlab/reference:" in out and "2 result rows, 4 weight files" in out
