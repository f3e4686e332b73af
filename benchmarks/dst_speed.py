"""Dynamic sparse training throughput: static, SET and RigL against dense training.

Trains LeNet-300-100 on Fashion-MNIST (SGD, momentum 0.9, lr 0.05, batch 100) four
ways in one process, on the same work (same steps, batch order and in-memory data):

  dense   ``ticketlab.train`` with no mask: the speed to match;
  static  ``ticketlab.train`` with a random ERK mask at the given sparsity, kept fixed;
  set     the same, with the ``DSTUpdater`` callback of ``ticketlab dst`` (SET: drop by
          magnitude, grow at random every delta-T steps);
  rigl    the same with RigL (grow by dense-gradient magnitude: one extra forward and
          backward every delta-T steps).

The sparse runs train on the kernels of ``--kernels``: ``dense`` (the default: the masked
dense path, whose goal is to cost no more than dense training, >= 0.95x its speed) or
``sparse`` (CSR kernels for every masked Linear layer, ``ticketlab.masks.sparse``: they
should make a very sparse network faster to train, >= 1.2x dense at 98% sparsity;
SET and RigL write back into the dense model at each mask update and rebuild the CSR
layers after it) or ``auto`` (CSR where a short timing finds it faster; same goal).

Each timed block is a fresh run of ``--steps`` steps from step 0, built as ``ticketlab
dst`` builds a replicate (``random_sparse_mask``, masked init, ``DSTUpdater`` with
delta-T 100, alpha 0.3, T_end = ``--t-end`` x steps). The methods are warmed up, then
alternate over several rounds (order rotating per round); the median steps/second of
each is reported. The figure is ``train_seconds`` of ``ticketlab.train`` (its step
loop). As in ``masked_training.py``, ``train()`` gets evaluation splits of one example,
so its end-of-loop evaluation costs ~nothing.

Run: ``python benchmarks/dst_speed.py [--steps N] [--rounds R] [--threads T]
[--sparsity S] [--kernels dense|sparse|auto]``, e.g. ``--sparsity 0.98 --kernels sparse``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
import warnings

import torch
from torch import nn

import ticketlab
from ticketlab.methods.dst import DSTUpdater, random_sparse_mask
from ticketlab.protocols import rewind, snapshot
from ticketlab.train import train

LR = 0.05
BATCH = 100
DELTA_T = 100
ALPHA = 0.3
GOALS = {"dense": 0.95, "sparse": 1.2, "auto": 1.2}  # per --kernels
METHODS = ("dense", "static", "set", "rigl")


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=500, help="timed steps per block (500)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the four methods (4)")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps per method first")
    p.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: cores)"
    )
    p.add_argument("--sparsity", type=float, default=0.9, help="pruned fraction (0.9)")
    p.add_argument("--distribution", default="erk", help="uniform, er or erk (erk)")
    p.add_argument("--t-end", type=float, default=1.0, help="T_end as a fraction of steps (1)")
    p.add_argument("--seed", type=int, default=0, help="init, mask and data-order seed (0)")
    p.add_argument(
        "--kernels",
        choices=tuple(GOALS),
        default="dense",
        help="kernels of the sparse runs: dense (default), sparse (CSR) or auto",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
    if not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if not 0.0 < args.t_end <= 1.0:
        p.error("--t-end must be in (0, 1]")
    return args


def cpu_busy_seconds() -> float | None:
    """CPU seconds all processes on the machine have used (Linux /proc/stat), else None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        data = ticketlab.data.load("fashion_mnist")
        # the training tensors in full; evaluation splits cut to one example
        self.data = dataclasses.replace(
            data, x_val=data.x_val[:1], y_val=data.y_val[:1], x_test=data.x_test[:1],
            y_test=data.y_test[:1],
        )  # fmt: skip
        self.full = data
        self.updates: dict[str, int] = {}
        self.kernels: dict[str, str] = {"dense": "dense"}

    def fresh_model(self) -> nn.Module:
        d = self.data
        return ticketlab.models.build(
            "lenet_300_100", d.input_shape, d.num_classes, init="xavier_normal", seed=self.args.seed
        )

    def spec(self, steps: int, kernels: str = "dense") -> ticketlab.Spec:
        return ticketlab.Spec(
            kernels=kernels,
            steps=f"{steps}it",
            optimizer="sgd",
            momentum=0.9,
            lr=LR,
            batch_size=BATCH,
            eval_every=f"{steps}it",
            seed=self.args.seed,
        )

    def run(self, method: str, steps: int) -> tuple[float, nn.Module]:
        """One fresh run of ``steps`` steps; returns its train_seconds and the model."""
        model = self.fresh_model()
        if method == "dense":
            out = train(model, self.data, self.spec(steps))
            return out["train_seconds"], model
        args = self.args
        gen = torch.Generator().manual_seed(args.seed + 1)
        mask = random_sparse_mask(model, 1.0 - args.sparsity, args.distribution, False, gen)
        rewind(model, snapshot(model), mask)
        callbacks = []
        if method != "static":
            updater = DSTUpdater(
                method,
                mask,
                DELTA_T,
                ALPHA,
                int(round(args.t_end * steps)),
                generator=torch.Generator().manual_seed(args.seed + 2),
            )
            callbacks.append(updater)
        out = train(model, self.data, self.spec(steps, args.kernels), mask, callbacks=callbacks)
        self.kernels[method] = out["kernels"]
        if callbacks:
            self.updates[method] = len(updater.updates)
        return out["train_seconds"], model

    def test_accuracy(self, model: nn.Module) -> float:
        return ticketlab.evaluate(model, self.full.x_test, self.full.y_test, 1000)[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's "beta" notices
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    print(
        f"torch {torch.__version__}  threads {torch.get_num_threads()}"
        f" (cores available: {default_threads()})"
    )
    print(
        f"LeNet-300-100 on fashion_mnist ({len(bench.data.y_train)} train examples), SGD lr {LR}"
        f" momentum 0.9, batch {BATCH}; sparsity {args.sparsity} ({args.distribution}),"
        f" delta-T {DELTA_T}, alpha {ALPHA}, T_end {args.t_end} x steps;"
        f" sparse runs on {args.kernels} kernels"
    )
    print(
        f"{args.rounds} rounds x {args.steps} steps per method, after {args.warmup} warm-up"
        " steps each; order rotates per round"
    )
    if args.warmup:
        for m in METHODS:
            bench.run(m, args.warmup)

    rates: dict[str, list[float]] = {m: [] for m in METHODS}
    last: dict[str, nn.Module] = {}
    t0, busy0, own0 = time.perf_counter(), cpu_busy_seconds(), time.process_time()
    for r in range(args.rounds):
        order = METHODS[r % len(METHODS) :] + METHODS[: r % len(METHODS)]
        for m in order:
            seconds, model = bench.run(m, args.steps)
            rates[m].append(args.steps / seconds)
            last[m] = model
    wall = time.perf_counter() - t0
    busy1, own1 = cpu_busy_seconds(), time.process_time()
    other = None if busy0 is None or busy1 is None else max(busy1 - busy0 - (own1 - own0), 0) / wall

    med = {m: statistics.median(v) for m, v in rates.items()}
    print()
    head = f"{'method':<8} {'median it/s':>11} {'vs dense':>8} {'updates':>7} {'test acc':>8}"
    head += "   per round it/s"
    print(head)
    print("-" * len(head))
    for m in METHODS:
        rounds = " ".join(f"{v:7.0f}" for v in rates[m])
        ups = bench.updates.get(m, 0)
        acc = bench.test_accuracy(last[m])
        print(f"{m:<8} {med[m]:11.0f} {med[m] / med['dense']:8.3f} {ups:7d} {acc:8.4f}   {rounds}")
    print(f"\n(timed rounds took {wall:.1f} s of wall time; updates = mask updates per block)")
    for m in METHODS:
        print(f"{m} trained on: {bench.kernels.get(m, '?')}")
    paired = {}
    for m in METHODS[1:]:
        per_round = [a / b for a, b in zip(rates[m], rates["dense"])]
        paired[m] = statistics.median(per_round)
        print(
            f"{m}/dense per round: " + " ".join(f"{v:.3f}" for v in per_round)
            + f"  (median {paired[m]:.3f})"
        )  # fmt: skip
    if other is not None:
        print(f"other processes kept {other:.2f} of {os.cpu_count()} cores busy")
        if other > 0.1:
            print(
                "WARNING: the machine was busy with other work, so the figures are noisy;"
                " rerun on an idle machine, with more --rounds or --threads 1."
            )
    goal = GOALS[args.kernels]
    for m in METHODS[1:]:
        ratio = med[m] / med["dense"]
        flag = "ok" if ratio >= goal else "BELOW GOAL"
        print(
            f"ratio {m}/dense ({args.kernels} kernels, sparsity {args.sparsity}): {ratio:.3f}"
            f" (goal >= {goal}) {flag}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
