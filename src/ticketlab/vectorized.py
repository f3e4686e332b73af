"""Vectorised training: K copies of one architecture in one process, one step for all.

The copies' parameters are stacked along a new leading dimension (``torch.func``'s
``stack_module_state``); one ``vmap`` of ``functional_call`` runs the forward and one
backward pass serves all of them. Each copy keeps what makes it its own run: its mask
(a stacked float mask re-applied after every step, so pruned weights stay exactly
zero), its data order and augmentation (its own seeds' batches), and its optimizer
state (one optimizer over the stacked tensors: SGD, Adam and RMSprop act elementwise,
so each slice of the state is what that copy's own optimizer would hold).

What a copy writes is what :func:`ticketlab.train.train` writes for it: its own
``metrics.jsonl`` and checkpoints in the same format, so a vectorised phase resumes
vectorised or sequentially, and the returned metrics have the same keys. Results equal
sequential training within float tolerance (batched kernels sum in another order).

Not everything vectorises. :func:`why_not_vectorized` names what does not (BatchNorm's
running statistics, dropout's random draws, callbacks, copies that differ in
architecture or step) and the caller then trains sequentially and says so.
"""

from __future__ import annotations

import contextlib
import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from .data import BatchSampler, Dataset
from .errors import Diverged, RunInterrupted, UsageError
from .masks import Mask
from .runs import atomic_path
from .spec import Spec, resolve
from .train import (
    SETTLE_EVERY,
    clear_stop,
    load_checkpoint,
    lr_at,
    make_optimizer,
    mix_seed,
    phase_result,
    read_metrics,
    save_checkpoint,
    steps_per_epoch,
    stop_requested,
)


@dataclass
class Copy:
    """One copy's training: its model (trained in place), mask, seeds and directory."""

    model: nn.Module
    mask: Mask | None
    data_seed: int
    aug_seed: int
    workdir: Path | None = None
    label: str = "train"
    snapshot_steps: set = field(default_factory=set)
    on_snapshot: object = None


def why_not_vectorized(models: list[nn.Module], callbacks=()) -> str | None:
    """Why these models cannot train as one stack (None: they can)."""
    if callbacks:
        return "a method's training callbacks act on one model at a time"
    first = models[0]
    shapes = [(n, p.shape, p.requires_grad) for n, p in first.named_parameters()]
    for m in models:
        if [(n, p.shape, p.requires_grad) for n, p in m.named_parameters()] != shapes:
            return "the copies differ in architecture"
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm) and mod.track_running_stats:
                return (
                    "BatchNorm's running statistics are updated in place per copy, "
                    "which vmap cannot do"
                )
            if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
                return "dropout's random draws under vmap differ from a sequential run's"
    if not all(p.requires_grad for p in first.parameters()):
        return "some parameters are frozen"
    return None


def why_not_vectorized_run(spec: Spec, data: Dataset) -> str | None:
    """What in a training setup keeps it off the stacked path (None: nothing)."""
    if spec.loss_fn is not None or spec.metrics_fn is not None:
        return "a custom objective is evaluated one model at a time"
    if hasattr(data, "train_stream"):
        return "streamed data is read for one model at a time"
    if not (torch.is_tensor(data.x_train) and torch.is_tensor(data.y_train)):
        return "inputs or targets that are tuples or dicts"
    if spec.patience:
        return "early stopping by patience stops each copy at its own step"
    return None


class _SliceOptimizer:
    """The state of copy ``k`` in a stacked optimizer, as that copy's own optimizer's
    ``state_dict`` would be (for :func:`ticketlab.train.save_checkpoint`)."""

    def __init__(self, optimizer: torch.optim.Optimizer, k: int):
        self.optimizer, self.k = optimizer, k

    def state_dict(self) -> dict:
        sd = self.optimizer.state_dict()
        state = {
            i: {
                key: (v[self.k] if torch.is_tensor(v) and v.dim() > 0 else v)
                for key, v in st.items()
            }
            for i, st in sd["state"].items()
        }
        return {"state": state, "param_groups": sd["param_groups"]}


def train_stacked(
    copies: list[Copy],
    data: Dataset,
    spec: Spec,
    *,
    start: int = 0,
    end: int | None = None,
    lr_override: float | None = None,
    progress=None,
    label: str = "vectorised",
) -> list[dict | Diverged]:
    """Train ``copies`` on steps ``[start, end)`` as one stack; per copy, the metrics
    :func:`ticketlab.train.train` would return (plus ``vectorized``: the stack's size),
    or the :class:`~ticketlab.errors.Diverged` of a copy whose loss became non-finite
    (the others go on: each copy's gradient is its own loss's)."""
    models = [c.model for c in copies]
    reason = why_not_vectorized(models) or why_not_vectorized_run(spec, data)
    if reason:
        raise UsageError(f"cannot vectorise: {reason}")
    K = len(copies)
    res = resolve(spec, steps_per_epoch(data, spec.batch_size))
    end = res.steps if end is None else end
    if not 0 <= start < end:
        raise UsageError(f"empty training phase [{start}, {end})")
    device = next(models[0].parameters()).device
    x_train, y_train = data.x_train.to(device), data.y_train.to(device)
    evals = [
        ("val", data.x_val.to(device), data.y_val.to(device)),
        ("test", data.x_test.to(device), data.y_test.to(device)),
    ]
    names = [n for n, _ in models[0].named_parameters()]
    masks = _stacked_masks(copies, names, device)

    # resume: every copy from its checkpoint at one step, or none
    step, seconds = start, 0.0
    rows: list[list[dict]] = [[] for _ in copies]
    ckpts = [c.workdir / "checkpoint.safetensors" if c.workdir else None for c in copies]
    have = [p is not None and p.exists() for p in ckpts]
    optimizers = None
    if any(have):
        if not all(have):
            raise UsageError("cannot vectorise: only some copies have a checkpoint")
        optimizers, steps = [], set()
        for c, path in zip(copies, ckpts):
            opt = make_optimizer(c.model, spec)
            s, extra = load_checkpoint(path, c.model, opt)
            steps.add(s)
            optimizers.append(opt)
            seconds = max(seconds, extra.get("train_seconds", 0.0))
        if len(steps) > 1:
            raise UsageError("cannot vectorise: the copies' checkpoints are at different steps")
        step = steps.pop()
        for k, c in enumerate(copies):
            rows[k] = read_metrics(c.workdir / "metrics.jsonl", step)
            with atomic_path(c.workdir / "metrics.jsonl") as tmp, open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in rows[k])

    stack = _stack(models)
    params = dict(stack.parameters)
    optimizer = make_optimizer(models[0], spec, list(params.values()))
    if optimizers is not None:
        _stack_optimizer_state(optimizer, optimizers, list(params.values()))
    _apply(params, masks)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if spec.amp == "bf16"
        else contextlib.nullcontext()
    )

    def write_back() -> None:
        with torch.no_grad():
            for k, m in enumerate(models):
                for n, p in m.named_parameters():
                    p.copy_(params[n][k])

    def record(at: int, alive) -> None:
        results = {}
        with torch.no_grad():
            for split, x, y in evals:
                results[split] = _evaluate_stacked(stack, x, y, spec.eval_batch_size, K)
        for k, c in enumerate(copies):
            if not alive[k]:
                continue
            row = {"step": at}
            for split in ("val", "test"):
                row[f"{split}_loss"], row[f"{split}_accuracy"] = results[split][k]
            rows[k].append(row)
            if c.workdir is not None:
                with open(c.workdir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")

    alive = [True] * K
    if optimizers is None:
        for c in copies:
            if c.workdir is not None:
                c.workdir.mkdir(parents=True, exist_ok=True)
                (c.workdir / "metrics.jsonl").write_text("")
        _snapshots(copies, step, write_back)
        record(step, alive)

    samplers = [BatchSampler(len(y_train), spec.batch_size, c.data_seed) for c in copies]
    augment = data.augment is not None
    gen = torch.Generator(device="cpu")
    task = progress.add_task(label, total=end - start, completed=step - start) if progress else None
    broken = torch.zeros(K, dtype=torch.bool, device=device)
    clean = torch.zeros(K, dtype=torch.int64, device=device)
    loop_start, current_lr = step, None
    pending: list[torch.Tensor] = []  # each step's K losses, folded in by settle()

    def settle() -> None:  # as train() does it: a few device ops for all pending steps
        if pending:
            ok = torch.isfinite(torch.stack(pending))  # [steps, K]
            pending.clear()
            clean.add_(torch.where(broken, 0, ok.cumprod(0).sum(0)))
            broken.logical_or_(~ok.all(0))

    outcome: list[dict | Diverged | None] = [None] * K
    t0 = time.perf_counter()
    next_checkpoint = t0 + spec.checkpoint_seconds if spec.checkpoint_seconds else 0.0
    any_ckpt = any(p is not None for p in ckpts)
    while step < end:
        lr = lr_override if lr_override is not None else lr_at(step, spec, res)
        if lr != current_lr:
            for g in optimizer.param_groups:
                g["lr"] = lr
            current_lr = lr
        idx = torch.stack([s.indices(step) for s in samplers]).to(device)
        x, y = x_train[idx], y_train[idx]
        if augment:
            parts = []
            for k, c in enumerate(copies):
                gen.manual_seed(mix_seed(c.aug_seed, step))
                parts.append(data.augment_batch(x[k], gen))
            x = torch.stack(parts)
        with autocast:  # cross-entropy is computed in float32 under autocast
            out = stack.train_logits(x)  # [K, B, classes]
            losses = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        losses = losses.view(K, -1).mean(1)
        pending.append(losses.detach())
        optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        optimizer.step()
        _apply(params, masks)
        step += 1
        if any(step in c.snapshot_steps for c in copies):
            _snapshots(copies, step, write_back)
        evaluating = step % res.eval_every == 0 or step == end
        checkpointing = (
            any_ckpt
            and step < end
            and (step % res.checkpoint_every == 0 or 0 < next_checkpoint <= time.perf_counter())
        )
        stopping = stop_requested()
        if evaluating or checkpointing or stopping or step % SETTLE_EVERY == 0:
            settle()
        if evaluating or checkpointing or stopping:
            for k in torch.nonzero(broken).flatten().tolist():
                if alive[k]:  # this copy stops here; its row says where it diverged
                    alive[k] = False
                    last = dict(rows[k][-1]) if rows[k] else {}
                    w = copies[k].workdir
                    outcome[k] = Diverged(copies[k].label, loop_start + int(clean[k]), w, last)
            if not any(alive):
                break
            if evaluating:
                record(step, alive)
            if checkpointing or stopping:
                write_back()
                elapsed = seconds + time.perf_counter() - t0
                for k, c in enumerate(copies):
                    if alive[k] and ckpts[k] is not None:
                        extra = {"train_seconds": elapsed, "sparse_layers": []}
                        sd = _SliceOptimizer(optimizer, k)
                        save_checkpoint(ckpts[k], c.model, sd, step, extra, (), c.mask)
                if next_checkpoint:
                    next_checkpoint = time.perf_counter() + spec.checkpoint_seconds
            if task is not None:
                progress.update(task, completed=step - start)
            if stopping:
                clear_stop()
                raise RunInterrupted(f"interrupted at step {step}; checkpoints saved")
    seconds += time.perf_counter() - t0
    write_back()
    if task is not None:
        progress.update(task, completed=end - start, visible=False)
    for k, c in enumerate(copies):
        if outcome[k] is not None:
            continue
        # the stack's time, shared: each copy cost about 1/K of it
        share = seconds / K
        got = phase_result(c.model, x_train, y_train, rows[k], spec, end - start, share, "dense")
        outcome[k] = {**got, "vectorized": K}
    return outcome


def _stacked_masks(copies, names, device) -> dict[str, torch.Tensor]:
    """Per parameter some copy prunes, the copies' masks stacked as floats (a copy that
    does not prune it: ones)."""
    pruned = {n for c in copies if c.mask is not None for n, m in c.mask.items() if not m.all()}
    named = [dict(c.model.named_parameters()) for c in copies]
    out = {}
    for n in names:
        if n not in pruned:
            continue
        rows = []
        for c, nm in zip(copies, named):
            m = dict(c.mask.items()).get(n) if c.mask is not None else None
            p = nm[n]
            rows.append(torch.ones_like(p) if m is None else m.to(device=device, dtype=p.dtype))
        out[n] = torch.stack(rows)
    return out


@torch.no_grad()
def _apply(params: dict, masks: dict) -> None:
    if masks:
        torch._foreach_mul_([params[n] for n in masks], list(masks.values()))


def _stack_optimizer_state(optimizer, optimizers, stacked_params) -> None:
    """Load per-copy optimizer states (in parameter order) into the stacked optimizer."""
    per_copy = [o.state_dict()["state"] for o in optimizers]
    state = {}
    for i in range(len(stacked_params)):
        if i not in per_copy[0]:
            continue
        entry = {}
        for key, v in per_copy[0][i].items():
            if torch.is_tensor(v) and v.dim() > 0:
                entry[key] = torch.stack([sd[i][key] for sd in per_copy])
            else:
                entry[key] = v
        state[i] = entry
    sd = optimizer.state_dict()
    sd["state"] = state
    sd["param_groups"] = optimizers[0].state_dict()["param_groups"]
    optimizer.load_state_dict(sd)


def _snapshots(copies, step, write_back) -> None:
    due = [c for c in copies if step in c.snapshot_steps and c.on_snapshot]
    if due:
        write_back()
        for c in due:
            c.on_snapshot(step, c.model)


def _evaluate_stacked(stack, x, y, batch_size, K):
    """Per copy, mean loss and accuracy on (x, y): (nan, nan) on an empty split.

    Each stacked call takes ``batch_size // K`` examples for all K copies, so that the
    stack's activations at evaluation are those of one model's evaluation batch: K copies
    cost K times one model's parameters, not K times its evaluation activations too."""
    if len(y) == 0:
        return [(float("nan"), float("nan"))] * K
    loss = torch.zeros(K, dtype=torch.float64, device=x.device)
    correct = torch.zeros(K, dtype=torch.int64, device=x.device)
    batch_size = max(1, batch_size // K)
    for i in range(0, len(y), batch_size):
        out = stack.eval_logits(x[i : i + batch_size])  # [K, B, classes]
        yy = y[i : i + batch_size]
        ce = F.cross_entropy(out.flatten(0, 1), yy.repeat(K), reduction="none")
        loss += ce.view(K, -1).sum(1).double()
        correct += (out.argmax(-1) == yy).sum(1)
    return [(float(loss[k]) / len(y), int(correct[k]) / len(y)) for k in range(K)]


# two ways to run K copies at once ---------------------------------------------


class _StackedLinear(nn.Module):
    """K Linear layers as one: the copies' rows are stacked along the batch (copy-major),
    and one batched matmul computes every copy's output."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.K = len(layers)
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        has_bias = layers[0].bias is not None
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())
            if has_bias
            else None
        )

    def forward(self, x):
        lead, width = x.shape[:-1], x.shape[-1]
        xb = x.reshape(self.K, -1, width)
        wt = self.weight.transpose(1, 2)
        out = torch.bmm(xb, wt) if self.bias is None else torch.baddbmm(self.bias[:, None], xb, wt)
        return out.reshape(*lead, out.shape[-1])


class _StackedConv2d(nn.Module):
    """K Conv2d layers as one grouped convolution: copy k's channels are group block k."""

    def __init__(self, layers: list[nn.Conv2d]):
        super().__init__()
        first = layers[0]
        self.K, self.conv = len(layers), first
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]).clone())
        self.bias = (
            nn.Parameter(torch.stack([m.bias.detach() for m in layers]).clone())
            if first.bias is not None
            else None
        )

    def forward(self, x):
        K, c = self.K, self.conv
        kb, ch, h, w = x.shape
        b = kb // K
        xg = x.view(K, b, ch, h, w).transpose(0, 1).reshape(b, K * ch, h, w)
        weight = self.weight.reshape(K * c.out_channels, *self.weight.shape[2:])
        bias = None if self.bias is None else self.bias.reshape(-1)
        out = F.conv2d(xg, weight, bias, c.stride, c.padding, c.dilation, K * c.groups)
        oh, ow = out.shape[-2:]
        return out.view(b, K, c.out_channels, oh, ow).transpose(0, 1).reshape(kb, -1, oh, ow)


class _Stack:
    """K copies of one model run as one: ``parameters`` (name -> stacked tensor, the
    names of the original model), ``train_logits(x [K, B, ...])`` and
    ``eval_logits(x [B, ...])``, both [K, B, classes]."""

    def __init__(self, parameters, train_logits, eval_logits):
        self.parameters = parameters
        self.train_logits, self.eval_logits = train_logits, eval_logits


def _stack(models: list[nn.Module]) -> _Stack:
    """Batched kernels where every layer with parameters is a Linear or a zero-padded
    Conv2d (a batched matmul, a grouped convolution: faster than ``vmap`` on CPU);
    otherwise ``vmap`` over ``functional_call``."""
    K, first = len(models), models[0]
    kinds = {}
    for name, mod in first.named_modules():
        if isinstance(mod, nn.Linear):
            kinds[name] = _StackedLinear
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode == "zeros":
            kinds[name] = _StackedConv2d
    owned = {f"{m}.{p}" if m else p for m in kinds for p in ("weight", "bias")}
    plain = all(n in owned for n, _ in first.named_parameters()) and not list(first.buffers())
    if plain:
        stacked = copy.deepcopy(first)
        modules = [dict(m.named_modules()) for m in models]
        for name, kind in kinds.items():
            layer = kind([mods[name] for mods in modules])
            parent, _, leaf = name.rpartition(".")
            setattr(stacked.get_submodule(parent) if parent else stacked, leaf, layer)
        stacked.train()

        def train_logits(x):
            return stacked(x.flatten(0, 1)).view(K, x.shape[1], -1)

        def eval_logits(x):
            xs = x.unsqueeze(0).expand(K, *x.shape).reshape(K * x.shape[0], *x.shape[1:])
            return stacked(xs).view(K, x.shape[0], -1)

        return _Stack(dict(stacked.named_parameters()), train_logits, eval_logits)

    params, buffers = stack_module_state(models)
    names = [n for n, _ in first.named_parameters()]
    params = {n: params[n].detach().clone().requires_grad_(True) for n in names}
    base = copy.deepcopy(first).to("meta")

    def one(p, b, x):
        return functional_call(base, (p, b), (x,))

    batched, shared = vmap(one), vmap(one, in_dims=(0, 0, None))
    return _Stack(
        params, lambda x: batched(params, buffers, x), lambda x: shared(params, buffers, x)
    )


__all__ = ["Copy", "train_stacked", "why_not_vectorized", "why_not_vectorized_run"]
