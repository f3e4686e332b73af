"""Structured pruning pays at inference: latency of a VGG with half its channels removed.

A VGG-11 with BatchNorm (ticketlab's ``vgg11``, plain ``nn.Module``) on 1x28x28
inputs. Its BN scales are set to random magnitudes (as a trained network's would
differ), 50% of the units of every removable layer are chosen by ``bn`` scale
(``select_units(..., 0.5)``) and ``remove_units`` builds the smaller network.
Both are then timed in turn, in one process, on CPU inference of a batch of 256
under ``torch.inference_mode``: the dense network is the plain PyTorch
reference, the pruned one is what ticketlab gives back. Each is warmed up; then
they alternate for ``--rounds`` rounds of ``--reps`` forward passes each, and the
median time per batch of each is reported with the latency ratio next to the
multiply-add ratio (the theoretical speedup). Outputs of the pruned network are
checked against the masked dense one before timing.

This is done in both memory formats, the default (contiguous NCHW) and
channels-last (model and input converted alike, for dense and pruned): the
element-wise layers (BatchNorm, ReLU, max-pool) only halve with the channels,
so how much of the 4x multiply-add saving reaches the clock depends on how fast
the convolutions are relative to them.

With ``--clock cpu`` the process's CPU time is used, which is steadier on a
shared machine with ``--threads 1``.

Run: ``python benchmarks/structured_speed.py [--threads T] [--rounds R] [--width W]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from ticketlab.models import build
from ticketlab.pruning.structured import (
    expand,
    multiply_adds,
    parameter_count,
    remove_units,
    select_units,
    unit_scores,
)

GOAL = 3.4
SHAPE = (1, 28, 28)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0, help="VGG width multiplier")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=3, help="forward passes per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument(
        "--formats",
        default="contiguous,channels_last",
        help="memory formats to time, comma-separated: contiguous, channels_last",
    )
    return p.parse_args(argv)


def timed(model: nn.Module, x: torch.Tensor, reps: int, clock) -> float:
    with torch.inference_mode():
        t0 = clock()
        for _ in range(reps):
            model(x)
        return (clock() - t0) / reps


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    dense = build("vgg11", SHAPE, 10, width=args.width, seed=0)
    g = torch.Generator().manual_seed(0)
    for m in dense.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 2)
    dense.eval()
    keep = select_units(unit_scores(dense, "bn"), args.keep)
    pruned = remove_units(dense, keep).eval()

    x = torch.randn(args.batch, *SHAPE, generator=g)
    masked = copy.deepcopy(dense)
    expand(dense, keep).apply_(masked)
    with torch.inference_mode():
        diff = float((pruned(x) - masked(x)).abs().max())
    mac_ratio = multiply_adds(dense, SHAPE) / multiply_adds(pruned, SHAPE)
    print(
        f"vgg11 width {args.width:g}, batch {args.batch}, {100 * args.keep:.0f}% of channels "
        f"kept, {args.threads} thread(s), {args.clock} clock"
    )
    print(
        f"parameters {parameter_count(dense):,} -> {parameter_count(pruned):,}; "
        f"max |pruned - masked| = {diff:.2e}"
    )

    formats = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    for fmt in args.formats.split(","):
        if fmt not in formats:
            raise SystemExit(f"unknown memory format '{fmt}'; choose from: {', '.join(formats)}")
        mf = formats[fmt]
        models = {
            "dense": copy.deepcopy(dense).to(memory_format=mf),
            "pruned": copy.deepcopy(pruned).to(memory_format=mf),
        }
        xf = x.contiguous(memory_format=mf)
        for model in models.values():  # warm-up
            timed(model, xf, 2, clock)
        times: dict[str, list[float]] = {"dense": [], "pruned": []}
        for r in range(args.rounds):
            for name in ("dense", "pruned") if r % 2 == 0 else ("pruned", "dense"):
                times[name].append(timed(models[name], xf, args.reps, clock))
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = med["dense"] / med["pruned"]
        print(f"\n{fmt:14} {'ms/batch':>10} {'min':>8} {'max':>8}")
        for k, v in times.items():
            print(f"{k:14} {1e3 * med[k]:10.1f} {1e3 * min(v):8.1f} {1e3 * max(v):8.1f}")
        print(f"latency ratio dense/pruned: {ratio:.2f}x   multiply-add ratio: {mac_ratio:.2f}x")
        print(f"goal: >= {GOAL}x -> {'met' if ratio >= GOAL else 'NOT met'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
