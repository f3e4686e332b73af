"""The one training loop: steps, LR schedule, evaluation, checkpoints, resume.

It knows no method. A phase trains steps ``[start, end)`` of the original
schedule: the step index sets the learning rate and picks the batch, so weight
rewinding to step k trains ``[k, T)`` with the schedule fast-forwarded and the
data order continued, and LR rewinding trains ``[T - t, T)``.

The hot loop is plain PyTorch: batches are drawn by index from in-memory
tensors, the mask is kept by one fused multiply after the optimizer step, and
nothing syncs with ``.item()`` between evaluations.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .data import BatchSampler, Dataset, structure
from .distributed import data_parallel
from .errors import DataError, Diverged, RunInterrupted, UsageError
from .masks import Mask, MaskKeeper
from .masks.sparse import SparseKernels, choose_kernels
from .runs import atomic_path, pack_state, read_state_file, save_state
from .spec import Resolved, Spec, parse_steps, resolve, select_key

# The step loop keeps each step's loss and checks them for divergence this often (and at
# every evaluation and checkpoint): few device ops per step, no host sync.
SETTLE_EVERY = 256

# Set by the signal handler; read once per step.
_stop_requested = False


@contextlib.contextmanager
def stop_on_signals():
    """Turn SIGINT/SIGTERM into a checkpoint and :class:`RunInterrupted`.

    A second signal while the checkpoint is written interrupts at once.
    """
    global _stop_requested
    _stop_requested = False
    previous = {}

    def handler(signum, frame):
        global _stop_requested
        if _stop_requested:
            raise KeyboardInterrupt
        _stop_requested = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        _stop_requested = False


def stop_requested() -> bool:
    """Whether a stop (SIGINT/SIGTERM, :func:`request_stop`) is pending."""
    return _stop_requested


def request_stop() -> None:
    """Ask the running loop to checkpoint and raise :class:`RunInterrupted` after this step."""
    global _stop_requested
    _stop_requested = True


def clear_stop() -> None:
    global _stop_requested
    _stop_requested = False


def steps_per_epoch(data: Dataset, batch_size: int) -> int:
    n = data.n_train
    if batch_size > n:
        raise UsageError(f"batch size {batch_size} exceeds the {n} training examples")
    return n // batch_size


def lr_at(step: int, spec: Spec, res: Resolved) -> float:
    """The learning rate of the original schedule at ``step``."""
    lr = spec.lr
    if spec.schedule == "step":
        lr *= spec.gamma ** sum(1 for m in res.milestones if step >= m)
    elif spec.schedule == "cosine":
        span = max(res.steps - res.warmup, 1)
        t = min(max(step - res.warmup, 0), span)
        lr *= 0.5 * (1.0 + math.cos(math.pi * t / span))
    if res.warmup and step < res.warmup:
        lr *= (step + 1) / res.warmup
    return lr


def make_optimizer(model: nn.Module, spec: Spec, params=None) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``model``'s trainable parameters, or over ``params``
    (a list of tensors: sparse kernels step kept values in place of weights)."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernels update every parameter in one pass: on LeNet-300-100 they make
    # Adam's step about a fifth faster than the default (benchmarks/masked_training.py).
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params
    )
    if spec.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=spec.lr,
            momentum=spec.momentum,
            nesterov=spec.nesterov,
            weight_decay=spec.weight_decay,
            fused=fused or None,
        )
    if spec.optimizer == "rmsprop":
        return torch.optim.RMSprop(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay, fused=fused or None)


def accuracy_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """``{"accuracy": ...}`` of logits (N, C) against class indices: a ``metrics_fn`` for a
    custom classification loss."""
    return {"accuracy": (outputs.argmax(1) == targets).float().mean()}


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, loss_fn=None, metrics_fn=None) -> dict:
    """``{"loss": mean, <metric>: mean, ...}`` over ``batches`` of (inputs, targets).

    Without ``loss_fn`` and ``metrics_fn``: cross-entropy and accuracy, summed exactly.
    ``loss_fn`` and each value of ``metrics_fn`` are batch means, weighted here by the
    batch size (exact for per-example means). NaN for every value on no examples.
    """
    was_training = model.training
    model.eval()
    loss = correct = None
    sums: dict = {}
    count = 0
    for x, yy in batches:
        out = structure.call(model, x)
        n = structure.length(yy)
        if loss is None:
            dev = structure.leaves(yy)[0].device
            loss = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
        if loss_fn is None:
            loss += F.cross_entropy(out, yy, reduction="sum").double()
        else:
            loss += loss_fn(out, yy).detach().double() * n
        if metrics_fn is None and loss_fn is None:
            correct += (out.argmax(1) == yy).sum()
        elif metrics_fn is not None:
            for k, v in metrics_fn(out, yy).items():
                v = torch.as_tensor(v).detach().double().to(loss.device) * n
                sums[k] = sums[k] + v if k in sums else v
        count += n
    model.train(was_training)
    if metrics_fn is None and loss_fn is None:
        if not count:
            return {"loss": float("nan"), "accuracy": float("nan")}
        return {"loss": float(loss) / count, "accuracy": int(correct) / count}
    if not count:  # the metrics' names are unknown without a batch
        return {"loss": float("nan")}
    return {"loss": float(loss) / count, **{k: float(v) / count for k, v in sums.items()}}


def _tensor_batches(x, y, batch_size: int):
    for i in range(0, structure.length(y), batch_size):
        yield structure.rows(x, i, i + batch_size), structure.rows(y, i, i + batch_size)


def evaluate(
    model: nn.Module, x, y, batch_size: int = 1000, loss_fn=None, metrics_fn=None
) -> tuple[float, float] | dict:
    """Mean loss and accuracy; (nan, nan) on an empty split. With ``loss_fn`` or
    ``metrics_fn``, the dict of :func:`evaluate_batches`."""
    res = evaluate_batches(model, _tensor_batches(x, y, batch_size), loss_fn, metrics_fn)
    if loss_fn is None and metrics_fn is None:
        return res["loss"], res["accuracy"]
    return res


def best_row(rows: list[dict], select: str) -> dict:
    """The evaluation ``select`` picks (lowest loss, highest metric; ties: the earliest);
    the last row when none has a finite value."""
    key, lower = select_key(select)
    valid = [r for r in rows if key in r and not math.isnan(r[key])]
    if not valid:
        return rows[-1]
    return min(valid, key=lambda r: r[key]) if lower else max(valid, key=lambda r: r[key])


def _stale(rows: list[dict], select: str) -> int:
    """Evaluations since the best one."""
    best = best_row(rows, select)
    return sum(1 for r in rows if r["step"] > best["step"])


def mix_seed(seed: int, step: int) -> int:
    return (seed * 6364136223846793005 + step * 1442695040888963407 + 1) & ((1 << 63) - 1)


# checkpoints ---------------------------------------------------------------


def _stateful(callbacks) -> list[tuple[int, object]]:
    """The callbacks that keep state, with their index in the list."""
    return [
        (i, c)
        for i, c in enumerate(callbacks)
        if hasattr(c, "state_dict") and hasattr(c, "load_state_dict")
    ]


def _model_device(model) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def save_checkpoint(
    path: Path, model, optimizer, step: int, extra: dict, callbacks: Iterable = (), mask=None
) -> None:
    """Write model, optimizer, RNG and ``step``; and each stateful callback's
    ``state_dict()``: its tensors as ``callback/<index>/<key>``, the rest in the JSON.
    With ``mask`` the model's mostly pruned weights are stored compactly, as
    :func:`ticketlab.runs.save_state` stores them (the optimizer's state stays dense)."""
    tensors, layout = pack_state(model.state_dict(), mask, prefix="model/")
    osd = optimizer.state_dict()
    scalars = {}
    for idx, st in osd["state"].items():
        for key, val in st.items():
            if torch.is_tensor(val):
                tensors[f"optim/{idx}/{key}"] = val.detach().cpu().contiguous()
            else:
                scalars[f"{idx}/{key}"] = val
    tensors["rng/torch"] = torch.get_rng_state()
    device = _model_device(model)
    if device.type == "cuda":  # e.g. dropout on the GPU draws from the device's generator
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    cb_meta = {}
    for i, cb in _stateful(callbacks):
        values = {}
        for key, val in cb.state_dict().items():
            if torch.is_tensor(val):
                tensors[f"callback/{i}/{key}"] = val.detach().cpu().contiguous()
            else:
                values[key] = val
        cb_meta[str(i)] = {"type": type(cb).__name__, "values": values}
    meta = {
        "step": step,
        "param_groups": osd["param_groups"],
        "optim_scalars": scalars,
        "extra": extra,
        "callbacks": cb_meta,
    }
    if layout:
        meta["compact"] = layout
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata={"ticketlab": json.dumps(meta)})


def load_checkpoint(path: Path, model, optimizer, callbacks: Iterable = ()) -> tuple[int, dict]:
    """Restore what :func:`save_checkpoint` wrote; returns the step and ``extra``.

    A stateful callback whose state the checkpoint lacks (or holds for another type
    at that index) is an error: resuming without it would not continue the run.
    """
    try:
        tensors, metadata = read_state_file(path)  # compact or not: both load
        meta = json.loads(metadata["ticketlab"])
    except Exception as exc:
        raise DataError(f"checkpoint {path} is corrupt: {exc}") from None
    # tensors are read onto the CPU and land on the model's device: a checkpoint written
    # on a GPU resumes on the CPU and the other way round
    device = _model_device(model)
    model.load_state_dict(
        {k[6:]: v.to(device) for k, v in tensors.items() if k.startswith("model/")}
    )
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim/"):
            _, idx, key = k.split("/", 2)
            state.setdefault(int(idx), {})[key] = v.to(device) if key != "step" else v
    for k, v in meta["optim_scalars"].items():
        idx, key = k.split("/", 1)
        state.setdefault(int(idx), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng/torch"])
    if "rng/cuda" in tensors and device.type == "cuda":  # none kept from a CPU run
        torch.cuda.set_rng_state(tensors["rng/cuda"], device)
    saved = meta.get("callbacks", {})
    for i, cb in _stateful(callbacks):
        entry = saved.get(str(i))
        if entry is None or entry["type"] != type(cb).__name__:
            raise DataError(
                f"checkpoint {path} holds no state for callback {i} ({type(cb).__name__}); "
                "delete it to start this training again"
            )
        cb_state = dict(entry["values"])
        prefix = f"callback/{i}/"
        cb_state.update({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        cb.load_state_dict(cb_state)
    return int(meta["step"]), meta["extra"]


def read_metrics(path: Path, upto: int) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if row["step"] <= upto:
                rows.append(row)
    return rows


# the loop ------------------------------------------------------------------


def saved_weights_path(workdir: str | os.PathLike, step: int) -> Path:
    """Where ``--save-every`` keeps a phase's weights at ``step`` (compact safetensors)."""
    return Path(workdir) / "saved" / f"step-{step}.safetensors"


def saved_steps(workdir: str | os.PathLike) -> list[int]:
    """The steps at which a phase's weights were saved, in order."""
    found = []
    for p in (Path(workdir) / "saved").glob("step-*.safetensors"):
        tail = p.name[len("step-") : -len(".safetensors")]
        if tail.isdigit():
            found.append(int(tail))
    return sorted(found)


def _sparse_kernels(model, mask, spec, optimizer, callbacks, batch, chosen):
    """The phase's CSR kernels (None: all dense) and the weight names they took.

    ``chosen`` (a resumed phase's, from its checkpoint) is kept, so the run continues
    exactly; else :func:`~ticketlab.masks.sparse.choose_kernels` picks by ``spec.kernels``.
    A callback that may touch the model without saying when (``dense_view(step)``), and
    any ``before_step`` or ``on_epoch_end``, keeps the phase on dense kernels.
    """

    def factory(params):
        return make_optimizer(model, spec, params)

    if chosen is None:
        opaque = any(
            hasattr(c, "before_step")
            or hasattr(c, "on_epoch_end")
            or (hasattr(c, "after_step") and not hasattr(c, "dense_view"))
            for c in callbacks
        )
        chosen = [] if opaque else choose_kernels(model, mask, spec.kernels, batch, factory)
    if not chosen:
        return None, []
    phase = SparseKernels(model, mask, chosen, optimizer, factory, callbacks)
    return phase, phase.names


def train(
    model: nn.Module,
    data: Dataset,
    spec: Spec,
    mask: Mask | None = None,
    *,
    start: int = 0,
    end: int | None = None,
    lr_override: float | None = None,
    data_seed: int | None = None,
    aug_seed: int | None = None,
    workdir: str | os.PathLike | None = None,
    snapshot_steps: Iterable[int] = (),
    on_snapshot: Callable[[int, nn.Module], None] | None = None,
    progress=None,
    label: str = "train",
    callbacks: Iterable = (),
    checkpoint_steps: Iterable[int] = (),
) -> dict:
    """Train ``model`` in place on steps ``[start, end)`` of the schedule of ``spec``.

    With ``mask``, pruned weights are zeroed before training and after every
    optimizer step, so they stay exactly zero. With ``workdir``, metrics are appended
    to ``metrics.jsonl`` at every evaluation, a checkpoint is written every
    ``spec.checkpoint_every`` steps or ``spec.checkpoint_seconds`` seconds (whichever
    comes first) and on SIGINT/SIGTERM, and an existing one is resumed. Returns the final
    metrics (test/val/train loss and accuracy, the early-stop step, and more).

    ``callbacks`` are objects with either or both of the methods
    ``before_step(step, model, optimizer)`` (after backward, before the optimizer
    step: e.g. add a penalty's subgradient) and ``after_step(step, model, optimizer,
    keeper, x, y)`` (after the step and the mask: e.g. change the mask through
    ``keeper.set_mask``), and ``on_epoch_end(epoch, model)`` (after the last step
    of each epoch; ``epoch`` counts from 1). ``step`` is the index of the step just
    taken. A callback that keeps state exposes ``state_dict()`` (a flat dict of
    tensors and JSON values) and ``load_state_dict(state)``: with ``workdir``, its
    state is saved in every checkpoint and restored on resume, so the run continues
    exactly. Callbacks are matched by their position in ``callbacks``.
    ``checkpoint_steps`` are steps (counted as taken) to checkpoint at as well, e.g. a
    method's mask updates, whose own state files must agree with the checkpoint.

    A training loss that becomes non-finite (inf or NaN) is noticed at the next
    evaluation, without a per-step sync: nothing is recorded or checkpointed from
    the broken weights, and :class:`~ticketlab.errors.Diverged` is raised with the
    step index of the first non-finite loss and the last finite evaluation.

    ``spec.kernels`` (``dense``, ``sparse``, ``auto``) says whether masked Linear layers
    train on CSR kernels (:mod:`ticketlab.masks.sparse`): the optimizer then steps their
    kept values, and the dense weights and optimizer state are written back for every
    evaluation, checkpoint and snapshot and at the end, so all of these are as on the
    dense path. The choice is kept in the checkpoint (a resumed phase uses it again) and
    returned as ``kernels`` (``dense`` or ``sparse:<weight names>``). A callback runs
    beside CSR kernels only if it says at which steps it needs the dense model
    (``dense_view(step) -> bool``, as the DST updater does); any other keeps the phase
    dense.
    """
    callbacks = list(callbacks)
    res = resolve(spec, steps_per_epoch(data, spec.batch_size))
    end = res.steps if end is None else end
    if not 0 <= start < end:
        raise UsageError(f"empty training phase [{start}, {end})")
    data_seed = spec.seed if data_seed is None else data_seed
    aug_seed = spec.seed + 1 if aug_seed is None else aug_seed
    snapshot_steps = set(snapshot_steps)
    checkpoint_steps = set(checkpoint_steps)
    device = next(model.parameters()).device
    loss_fn, metrics_fn = spec.loss_fn, spec.metrics_fn
    objective = loss_fn if loss_fn is not None else F.cross_entropy
    # streamed data (a map-style dataset read by DataLoader workers) or tensors in memory
    streamed = hasattr(data, "train_stream")
    if streamed:
        x_train = y_train = None
        evals = [
            (split, functools.partial(data.eval_batches, split, spec.eval_batch_size, device))
            for split in ("val", "test")
        ]
    else:
        x_train = structure.to_device(data.x_train, device)
        y_train = structure.to_device(data.y_train, device)
        evals = [
            (split, functools.partial(_tensor_batches, *xy, spec.eval_batch_size))
            for split, xy in (
                ("val", (structure.to_device(data.x_val, device),
                         structure.to_device(data.y_val, device))),
                ("test", (structure.to_device(data.x_test, device),
                          structure.to_device(data.y_test, device))),
            )
        ]  # fmt: skip

    # under torchrun: this rank's share of every global batch, gradients averaged by DDP
    dp = data_parallel()
    if dp is not None:
        dp.check_batch(spec.batch_size)
        if callbacks:
            raise UsageError(
                f"{label}: data-parallel training runs phases without training callbacks; "
                f"this one has {', '.join(type(c).__name__ for c in callbacks)}"
            )
        dp.agree(mask)  # rank 0's mask on every rank, checked by its hash
    optimizer = make_optimizer(model, spec)
    keeper = MaskKeeper(model, mask)
    keeper()
    net = dp.wrap(model) if dp is not None else model
    if spec.compile:  # the mask is kept outside the forward pass: nothing in it breaks a graph
        net = torch.compile(net)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec.amp == "bf16"
        else contextlib.nullcontext()
    )
    workdir = Path(workdir) if workdir is not None else None
    ckpt = workdir / "checkpoint.safetensors" if workdir else None
    metrics_path = workdir / "metrics.jsonl" if workdir else None
    select = select_key(spec.select)[0]
    rows: list[dict] = []
    step, seconds = start, 0.0
    # weights every `save_every` steps (spec.save_every), kept for analyses over training
    save_every = (
        parse_steps(spec.save_every, res.steps_per_epoch, "save-every")
        if spec.save_every is not None and workdir is not None
        else 0
    )

    def save_weights(at: int) -> None:
        path = saved_weights_path(workdir, at)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            save_state(path, state, keeper.mask)

    sparse, sparse_layers = None, None  # CSR kernels of the phase, set below

    def record(at: int, extra: dict | None = None) -> None:
        row: dict = {"step": at}
        # evaluated as the dense path evaluates: dense weights, dense forward
        with sparse.dense_view() if sparse is not None else contextlib.nullcontext():
            for split, batches in evals:
                for k, v in evaluate_batches(model, batches(), loss_fn, metrics_fn).items():
                    row[f"{split}_{k}"] = v
        if not rows and not math.isnan(row["val_loss"]) and select not in row:
            raise UsageError(
                f"select {spec.select!r}: the evaluation reports "
                + ", ".join(k for k in row if k.startswith("val_"))
            )
        row.update(extra or {})
        rows.append(row)
        if metrics_path is not None:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    if ckpt is not None and ckpt.exists():
        step, extra = load_checkpoint(ckpt, model, optimizer, callbacks)
        seconds = extra.get("train_seconds", 0.0)
        sparse_layers = extra.get("sparse_layers", [])  # a checkpoint from before: dense
        rows = read_metrics(metrics_path, step)
        with atomic_path(metrics_path) as tmp, open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    else:
        if metrics_path is not None:
            workdir.mkdir(parents=True, exist_ok=True)
            metrics_path.write_text("")
        if step in snapshot_steps and on_snapshot:
            on_snapshot(step, model)
        if save_every and step % save_every == 0:
            save_weights(step)
        record(step)

    if streamed:  # resumable: the loader starts at `step`, with the batches it would have
        stream = data.train_stream(spec.batch_size, data_seed, aug_seed, step, end, device)
        probe = stream.peek()
    else:
        stream = None
        sampler = BatchSampler(data.n_train, spec.batch_size, data_seed, device=device)
        probe = structure.rows(x_train, 0, spec.batch_size)
    augment = data.augment is not None
    gen = torch.Generator(device="cpu")
    task = progress.add_task(label, total=end - start, completed=step - start) if progress else None
    current_lr = None
    before = [c.before_step for c in callbacks if hasattr(c, "before_step")]
    after = [c.after_step for c in callbacks if hasattr(c, "after_step")]
    epoch_end = [c.on_epoch_end for c in callbacks if hasattr(c, "on_epoch_end")]
    if dp is None and spec.amp == "none" and not spec.compile:
        sparse, sparse_layers = _sparse_kernels(
            model, mask, spec, optimizer, callbacks, probe, sparse_layers
        )
    else:  # DDP reduces the dense gradients (a choice by timing would differ per rank);
        # autocast and the compiler work on the dense layers
        sparse, sparse_layers = None, []
    t0 = time.perf_counter()
    # the time of the next checkpoint by the clock (0: none by the clock)
    next_checkpoint = t0 + spec.checkpoint_seconds if spec.checkpoint_seconds else 0.0
    model.train()
    # divergence, tracked on the device: `broken` once a loss was non-finite, `clean` counts
    # the steps before it; read only at evaluations. The step loop only keeps each loss
    # (`pending`); `settle` folds them in, at evaluations, checkpoints and every
    # SETTLE_EVERY steps (counted from step 0, so a resumed phase settles where an
    # uninterrupted one does), in a few device ops for all of them
    loop_start = step
    broken = torch.zeros((), dtype=torch.bool, device=device)
    clean = torch.zeros((), dtype=torch.int64, device=device)
    # streamed data: the training loss since the last evaluation, and the throughput
    run_loss = torch.zeros((), dtype=torch.float64, device=device)
    run_steps, run_t0 = 0, time.perf_counter()
    pending: list[torch.Tensor] = []

    def settle() -> None:
        if not pending:
            return
        losses = torch.stack(pending)
        pending.clear()
        ok = torch.isfinite(losses)
        clean.add_(torch.where(broken, 0, ok.cumprod(0).sum()))
        broken.logical_or_(~ok.all())
        if stream is not None:
            run_loss.add_(losses.double().sum())

    # the parameters the stepping optimizer holds, whose gradients each step clears
    # (as zero_grad(set_to_none=True) does, without its per-call bookkeeping)
    opt, grads_of = None, []
    while step < end:
        # what steps: the sparse kernels' optimizer over kept values, or the dense one
        stepping = optimizer if sparse is None else sparse.optimizer
        if stepping is not opt:
            opt = stepping
            grads_of = [p for g in opt.param_groups for p in g["params"]]
        lr = lr_override if lr_override is not None else lr_at(step, spec, res)
        if lr != current_lr:
            for g in opt.param_groups:
                g["lr"] = lr
            current_lr = lr
        if stream is None:
            idx = sampler.indices(step)  # on the device already
            if dp is not None:
                idx = dp.shard(idx)
            x, y = structure.take(x_train, idx), structure.take(y_train, idx)
            if augment:
                gen.manual_seed(mix_seed(aug_seed, step))
                x = data.augment_batch(x, gen)
        else:
            x, y = stream.batch(step)
            if dp is not None:  # every rank reads the global batch, then takes its part
                part = spec.batch_size // dp.world
                lo = dp.rank * part
                x, y = structure.rows(x, lo, lo + part), structure.rows(y, lo, lo + part)
        with autocast:
            loss = objective(structure.call(net, x), y)
        if stream is not None:
            run_steps += 1
        pending.append(loss.detach())
        for p in grads_of:
            p.grad = None
        loss.backward()
        if dp is not None:  # pruned weights get no gradient, hence no optimizer state
            keeper.mask_grads()
        for cb in before:
            cb(step, model, optimizer)
        opt.step()
        if sparse is None:
            keeper()
        else:
            sparse.keep()  # the masked layers left on dense kernels
        if sparse is not None and sparse.needs_dense(step):
            # e.g. a DST mask update: on the dense model, then the CSR layers are rebuilt
            with sparse.dense_view(keeper):
                for cb in after:
                    cb(step, model, optimizer, keeper, x, y)
        else:
            for cb in after:
                cb(step, model, optimizer, keeper, x, y)
        step += 1
        if epoch_end and step % res.steps_per_epoch == 0:
            for cb in epoch_end:
                cb(step // res.steps_per_epoch, model)
        if step in snapshot_steps and on_snapshot:
            if sparse is not None:
                sparse.write_back()
            on_snapshot(step, model)
        if save_every and step % save_every == 0:
            if sparse is not None:
                sparse.write_back()
            save_weights(step)
        evaluating = step % res.eval_every == 0 or step == end
        # checkpoints have their own interval (the end of a phase needs none: its caller
        # writes the final weights); an interruption always writes one
        by_clock = 0 < next_checkpoint <= time.perf_counter()
        stopping = _stop_requested
        if dp is not None:  # the ranks stop and checkpoint at the same step
            stopping, by_clock = dp.any(stopping, by_clock)
        checkpointing = (
            ckpt is not None
            and step < end
            and (step % res.checkpoint_every == 0 or step in checkpoint_steps or by_clock)
        )
        if evaluating or checkpointing or stopping or step % SETTLE_EVERY == 0:
            settle()
        if evaluating or checkpointing or stopping:
            is_broken = bool(broken)
            if dp is not None:  # a loss that broke on any rank broke the run
                (is_broken,) = dp.any(is_broken)
                clean = torch.full_like(clean, dp.min(int(clean)))
            if is_broken:
                if task is not None:
                    progress.update(task, visible=False)
                last = dict(rows[-1]) if rows else {}
                if sparse is not None:
                    sparse.close()
                raise Diverged(label, loop_start + int(clean), workdir, last)
            if sparse is not None:  # checkpoints hold the dense weights and optimizer state
                sparse.write_back()
            if evaluating:
                extra = None
                if stream is not None:
                    extra = stream.throughput(run_steps, time.perf_counter() - run_t0)
                    extra["train_loss"] = float(run_loss) / max(run_steps, 1)
                    run_loss.zero_()
                    run_steps, run_t0 = 0, time.perf_counter()
                record(step, extra)
            if ckpt is not None and (checkpointing or stopping):
                elapsed = seconds + time.perf_counter() - t0
                extra = {"train_seconds": elapsed, "sparse_layers": sparse_layers}
                save_checkpoint(ckpt, model, optimizer, step, extra, callbacks, keeper.mask)
                if next_checkpoint:
                    next_checkpoint = time.perf_counter() + spec.checkpoint_seconds
            if task is not None:
                progress.update(task, completed=step - start)
            if stopping:
                clear_stop()
                saved = "checkpoint saved" if ckpt is not None else "no checkpoint kept"
                if sparse is not None:
                    sparse.close()
                if stream is not None:
                    stream.close()
                raise RunInterrupted(f"interrupted at step {step}; {saved}")
            if evaluating and spec.patience and _stale(rows, spec.select) >= spec.patience:
                break  # early stopping: `patience` evaluations without a better `select`
    seconds += time.perf_counter() - t0
    if stream is not None:
        stream.close()
    if sparse is not None:  # the dense weights hold the result, as on the dense path
        sparse.close()
    if task is not None:
        progress.update(task, completed=end - start, visible=False)

    best = best_row(rows, spec.select)
    if loss_fn is not None or metrics_fn is not None or streamed:
        return _custom_result(
            model, data, spec, rows, best, x_train, y_train, step - start, seconds, sparse_layers
        )
    kernels = "sparse:" + ",".join(sparse_layers) if sparse_layers else "dense"
    return phase_result(model, x_train, y_train, rows, spec, step - start, seconds, kernels)


def phase_result(model, x_train, y_train, rows, spec, steps, seconds, kernels) -> dict:
    """What a phase on in-memory data with the classification objective returns: the last
    evaluation, the test accuracy at the step ``spec.select`` picks, and the training set's
    loss and accuracy now."""
    final, best = rows[-1], best_row(rows, spec.select)
    train_loss, train_acc = evaluate(model, x_train, y_train, spec.eval_batch_size)
    return {
        "test_accuracy": final["test_accuracy"],
        "test_loss": final["test_loss"],
        "val_accuracy": final["val_accuracy"],
        "val_loss": final["val_loss"],
        "best_val_step": best["step"],
        "test_accuracy_at_best_val": best["test_accuracy"],
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "steps": steps,
        "train_seconds": seconds,
        "kernels": kernels,
    }


def _custom_result(model, data, spec, rows, best, x_train, y_train, steps, seconds, sparse_layers):
    """The result of a phase with a custom objective or streamed data: every evaluated
    value at the end, the test values at the best step by ``spec.select``, and training
    values (streamed data: the mean training loss since the last evaluation, which costs no
    extra pass over a large set)."""
    final = rows[-1]
    out = {k: v for k, v in final.items() if k.startswith(("test_", "val_"))}
    out["best_val_step"] = best["step"]
    for k, v in best.items():
        if k.startswith("test_"):
            out[f"{k}_at_best_val"] = v
    if x_train is not None:
        res = evaluate_batches(
            model,
            _tensor_batches(x_train, y_train, spec.eval_batch_size),
            spec.loss_fn,
            spec.metrics_fn,
        )
        out.update({f"train_{k}": v for k, v in res.items()})
    else:
        out["train_loss"] = final.get("train_loss", float("nan"))
    out.update(
        steps=steps,
        train_seconds=seconds,
        kernels="sparse:" + ",".join(sparse_layers) if sparse_layers else "dense",
        select=spec.select,
    )
    return out
