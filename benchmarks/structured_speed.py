"""Structured pruning pays at inference: latency of a VGG with half its channels removed.

A VGG-11 with BatchNorm (ticketlab's ``vgg11``, plain ``nn.Module``) on 1x28x28
inputs. Its BN scales are set to random magnitudes (as a trained network's would
differ), 50% of the units of every removable layer are chosen by ``bn`` scale
(``select_units(..., 0.5)``) and ``remove_units`` builds the smaller network.
Outputs of the pruned network are checked against the masked dense one first.

Three networks are then timed in turn, in one process, on CPU inference of a
batch of 256 under ``torch.inference_mode``:

- ``dense``: the plain PyTorch reference;
- ``pruned``: what ticketlab gives back;
- ``built``: the same VGG class built directly at the pruned layer widths, with no
  pruning involved. ``pruned`` should run as fast as it: the smaller network carries
  no overhead from having been cut out of a larger one.

Each is warmed up; then they alternate (order rotating) for ``--rounds`` rounds of
``--reps`` forward passes each. Within a round the three run back to back, so the
per-round ratio dense/pruned cancels the slow drifts of a shared machine; the
median of the per-round ratios is reported (with their range) next to the
multiply-add ratio, the theoretical speedup.

Every network gets the same treatment in each mode (``--modes``):

- ``eager``: as built (contiguous NCHW);
- ``channels_last``: model and input converted to channels-last, the layout that
  PyTorch's CPU convolutions (oneDNN) run fastest in;
- ``compiled``: ``torch.compile`` (inductor) of the channels-last models, PyTorch's
  own deployment path. It fuses BatchNorm, ReLU and max-pool into fewer passes over
  memory, so more of the convolutions' saving reaches the clock. It needs a C++
  compiler, and compiling takes tens of seconds per network.

Why eager stays under the multiply-add ratio: BatchNorm, ReLU and max-pool are
memory-bound and only halve with the channels, while the convolutions drop 4x.

With ``--clock cpu`` the process's CPU time is used, which is steadier on a
shared machine with ``--threads 1``.

Run: ``python benchmarks/structured_speed.py [--threads T] [--rounds R] [--modes ...]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from ticketlab.metrics import multiply_adds, parameter_count
from ticketlab.models import build
from ticketlab.models.convnets import VGG
from ticketlab.pruning.structured import (
    expand,
    remove_units,
    select_units,
    unit_scores,
)

GOAL = 3.4
SHAPE = (1, 28, 28)
MODES = ("eager", "channels_last", "compiled")
NETS = ("dense", "pruned", "built")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--width", type=float, default=1.0, help="VGG width multiplier")
    p.add_argument("--keep", type=float, default=0.5, help="fraction of channels kept")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--reps", type=int, default=2, help="forward passes per round")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument(
        "--modes",
        default=",".join(MODES),
        help=f"what to time, comma-separated: {', '.join(MODES)}",
    )
    args = p.parse_args(argv)
    args.modes = args.modes.split(",")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode {bad[0]!r}; choose from: {', '.join(MODES)}")
    return args


def timed(model: nn.Module, x: torch.Tensor, reps: int, clock) -> float:
    with torch.inference_mode():
        t0 = clock()
        for _ in range(reps):
            model(x)
        return (clock() - t0) / reps


def vgg_cfg(model: VGG) -> list:
    """The layer widths of a VGG (``"M"`` for a max-pool), to build one directly."""
    cfg: list = []
    for m in model.features:
        if isinstance(m, nn.Conv2d):
            cfg.append(m.out_channels)
        elif isinstance(m, nn.MaxPool2d):
            cfg.append("M")
    return cfg


def prepare(model: nn.Module, mode: str) -> nn.Module:
    model = copy.deepcopy(model).eval()
    if mode == "eager":
        return model
    model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if mode == "compiled" else model


def time_mode(nets: dict, x: torch.Tensor, mode: str, args, clock) -> dict | None:
    xf = x if mode == "eager" else x.contiguous(memory_format=torch.channels_last)
    models = {}
    for name, net in nets.items():
        t0 = time.perf_counter()
        models[name] = prepare(net, mode)
        try:
            timed(models[name], xf, 2, clock)  # warm-up (and, compiled, the compilation)
        except Exception as e:  # inductor without a working C++ compiler, for one
            print(f"\n{mode}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            return None
        if mode == "compiled":
            print(f"compiled {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    times: dict[str, list[float]] = {n: [] for n in models}
    for r in range(args.rounds):
        order = NETS[r % 3 :] + NETS[: r % 3]
        for name in order:
            times[name].append(timed(models[name], xf, args.reps, clock))
    return times


def report(mode: str, times: dict, mac_ratio: float) -> float:
    ratios = [d / p for d, p in zip(times["dense"], times["pruned"])]
    ratio = statistics.median(ratios)
    print(f"\n{mode:14} {'ms/batch':>10} {'min':>8} {'max':>8}")
    for k, v in times.items():
        med = statistics.median(v)
        print(f"{k:14} {1e3 * med:10.1f} {1e3 * min(v):8.1f} {1e3 * max(v):8.1f}")
    built = statistics.median(b / p for b, p in zip(times["built"], times["pruned"]))
    print(
        f"latency ratio dense/pruned: {ratio:.2f}x (rounds {min(ratios):.2f}-{max(ratios):.2f})"
        f"   multiply-add ratio: {mac_ratio:.2f}x   built/pruned: {built:.2f}"
    )
    print(f"goal: >= {GOAL}x -> {'met' if ratio >= GOAL else 'NOT met'}")
    return ratio


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
    built = VGG(SHAPE, 10, vgg_cfg(pruned)).eval()

    x = torch.randn(args.batch, *SHAPE, generator=g)
    masked = copy.deepcopy(dense)
    expand(dense, keep).apply_(masked)
    with torch.inference_mode():
        diff = float((pruned(x) - masked(x)).abs().max())
    mac_ratio = multiply_adds(dense, SHAPE) / multiply_adds(pruned, SHAPE)
    print(
        f"vgg11 width {args.width:g}, batch {args.batch}, {100 * args.keep:.0f}% of channels "
        f"kept, {args.threads} thread(s), {args.clock} clock, torch {torch.__version__}"
    )
    print(
        f"parameters {parameter_count(dense):,} -> {parameter_count(pruned):,}; "
        f"max |pruned - masked| = {diff:.2e}"
    )

    nets = {"dense": dense, "pruned": pruned, "built": built}
    summary = {}
    for mode in args.modes:
        times = time_mode(nets, x, mode, args, clock)
        if times is not None:
            summary[mode] = report(mode, times, mac_ratio)
    print("\nsummary: " + ", ".join(f"{m} {r:.2f}x" for m, r in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
