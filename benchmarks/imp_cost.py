"""Training cost of each IMP level: LeNet-300-100 steps at falling density vs the dense level.

Iterative magnitude pruning (Frankle & Carbin's rates: 20% of each hidden layer and 10%
of the output layer per level) trains the same network again at every level, so a
lottery run costs the sum of its levels. This script times one training step of
LeNet-300-100 on Fashion-MNIST (Adam, lr 1.2e-3, batch 60) at the masks of several
levels, from the dense level 0 (100%) down to level 18 (1.8% of the weights), in one
process, on the same work (same steps, in-memory data and batch order):

  dense      ``ticketlab.train(..., kernels="dense")``: the masked dense path (the
             pruned weights are zeroed after every step: the cost stays the dense one);
  sparse     ``kernels="sparse"``: every masked Linear layer on CSR kernels
             (``ticketlab.masks.sparse``: ``W_csr @ x.T`` forward, ``sampled_addmm``
             weight gradient, Adam over the kept values only);
  auto       ``kernels="auto"`` (the default): CSR kernels for the layers below 20%
             density where a short timing at the start of the phase finds them faster;
             the layers it took are printed;
  sparselab  the peer a user would pick instead (``pip install sparselab``): a plain
             PyTorch loop over ``sparselab.SparseLinear`` layers at the same per-layer
             densities (its own random pattern; a fully dense layer stays ``nn.Linear``).
             Skipped, with the reason printed, where it does not import.

The masks are those of layerwise magnitude pruning of the initial weights at the IMP
rates: a kernel's cost depends on the kept count of each layer, not on which weights.
Each block is a fresh ``train()`` of ``--steps`` steps from the level's mask; as in
``masked_training.py`` the figure is ``train_seconds`` (its step loop) and ``train()`` gets
evaluation splits of one example (and 6000 training examples, so that its end-of-phase
training-set evaluation stays short). Every method is warmed up at every level, then
each round times every (level, method) once, in rotating order. The printed ratio is,
per round, a block's time per step over the dense level 0's of the same round, and its
median over rounds. Goal: the 2% level on sparse kernels costs at most 0.4 of the dense
level.

On a shared machine use ``--threads 1 --clock cpu``: this process's CPU time (for
ticketlab: the CPU time of ``train()`` for N steps less that of a 1-step call, over N - 1
steps), which other processes disturb far less.

Run: ``python benchmarks/imp_cost.py [--steps N] [--rounds R] [--threads T]
[--clock wall|cpu] [--levels 0,5,10,18]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import ticketlab
from ticketlab.data import BatchSampler

LR = 1.2e-3
BATCH = 60
GOAL = 0.4
TRAIN_EXAMPLES = 6000
LEVELS = (0, 3, 5, 8, 10, 13, 15, 17, 18)
METHODS = ("dense", "sparse", "auto", "sparselab")


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_levels(text: str) -> tuple[int, ...]:
    levels = tuple(sorted({int(s) for s in text.split(",") if s.strip()}))
    if not levels or levels[0] != 0:
        raise argparse.ArgumentTypeError("levels must include 0, the dense level")
    return levels


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="timed steps per block (300)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over levels x methods (3)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps per block first (30)")
    p.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: cores)"
    )
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default): train_seconds; cpu: this process's CPU time, far less disturbed"
        " by other processes on a shared machine (needs --threads 1)",
    )
    p.add_argument(
        "--levels",
        type=parse_levels,
        default=LEVELS,
        help="IMP levels to time, 0 included (default: " + ",".join(map(str, LEVELS)) + ")",
    )
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (0)")
    args = p.parse_args(argv)
    if args.steps < 2 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps >= 2, --rounds and --threads >= 1, --warmup >= 0")
    if args.clock == "cpu" and args.threads != 1:
        # with more threads, CPU time also counts OpenMP workers spinning while they wait
        p.error("--clock cpu needs --threads 1")
    return args


def load_sparselab(threads: int):
    """The sparselab module, or the reason it is not there."""
    # its OpenMP runtime is its own: give it the thread count before it loads
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import sparselab
    except Exception as exc:  # not installed, or its extension does not load
        return None, f"{type(exc).__name__}: {exc} (try: pip install sparselab)"
    return sparselab, None


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        data = ticketlab.data.load("fashion_mnist")
        n = min(TRAIN_EXAMPLES, len(data.y_train))
        self.data = dataclasses.replace(
            data, x_train=data.x_train[:n], y_train=data.y_train[:n], x_val=data.x_val[:1],
            y_val=data.y_val[:1], x_test=data.x_test[:1], y_test=data.y_test[:1],
        )  # fmt: skip
        self.masks = self.imp_masks(args.levels)
        self.sparselab, self.sparselab_missing = load_sparselab(args.threads)
        self.chosen: dict[int, str] = {}
        self.alive: list[nn.Module] = []

    def fresh_model(self) -> nn.Module:
        d = self.data
        return ticketlab.models.build(
            "lenet_300_100", d.input_shape, d.num_classes, init="xavier_normal", seed=self.args.seed
        )

    def imp_masks(self, levels) -> dict[int, ticketlab.Mask]:
        model = self.fresh_model()
        mask = ticketlab.Mask.dense(model)
        out = {}
        for level in range(max(levels) + 1):
            if level:
                mask = ticketlab.prune(model, mask, fraction=0.2, output_fraction=0.1)
                mask.apply_(model)
            if level in levels:
                out[level] = mask
        return out

    def spec(self, steps: int, kernels: str) -> ticketlab.Spec:
        return ticketlab.Spec(
            steps=f"{steps}it", optimizer="adam", lr=LR, batch_size=BATCH,
            eval_every=f"{steps}it", seed=self.args.seed, kernels=kernels,
        )  # fmt: skip

    def ticketlab_block(self, level: int, kernels: str, steps: int) -> float:
        """Seconds per step of ``train()`` at ``level``'s mask."""
        mask = self.masks[level]
        if self.args.clock == "wall":
            out = ticketlab.train(self.fresh_model(), self.data, self.spec(steps, kernels), mask)
            self.chosen[level] = out["kernels"] if kernels == "auto" else self.chosen.get(level)
            return out["train_seconds"] / steps
        t0 = time.process_time()
        out = ticketlab.train(self.fresh_model(), self.data, self.spec(steps, kernels), mask)
        t1 = time.process_time()
        ticketlab.train(self.fresh_model(), self.data, self.spec(1, kernels), mask)
        t2 = time.process_time()
        if kernels == "auto":
            self.chosen[level] = out["kernels"]
        return ((t1 - t0) - (t2 - t1)) / (steps - 1)

    def sparselab_model(self, level: int) -> nn.Module:
        sl = self.sparselab
        mask = self.masks[level]
        layers: list[nn.Module] = [nn.Flatten()]
        names = mask.names()
        for i, name in enumerate(names):
            out_f, in_f = mask[name].shape
            density = float(mask[name].float().mean())
            if density >= 1.0:
                layers.append(nn.Linear(in_f, out_f))
            else:
                layers.append(sl.SparseLinear(in_f, out_f, sparsity=1.0 - density))
            if i < len(names) - 1:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)

    def sparselab_block(self, level: int, steps: int) -> float:
        """Seconds per step of a plain Adam loop over the sparselab model at ``level``."""
        torch.manual_seed(self.args.seed)
        model = self.sparselab_model(level)
        # sparselab caches each layer's transpose by id(): a new layer that reuses a freed
        # one's id would get a stale transpose (a limitation its source documents), so no
        # layer is freed while the benchmark runs
        self.alive.append(model)
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        d = self.data
        sampler = BatchSampler(len(d.y_train), BATCH, self.args.seed)
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        model.train()
        t0 = clock()
        for step in range(steps):
            idx = sampler.indices(step)
            x, y = d.x_train.index_select(0, idx), d.y_train.index_select(0, idx)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return (clock() - t0) / steps

    def block(self, level: int, method: str, steps: int) -> float | None:
        if method == "sparselab":
            return None if self.sparselab is None else self.sparselab_block(level, steps)
        return self.ticketlab_block(level, method, steps)


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", message=".*[Ss]parse.*")  # torch's "beta" notices
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    levels = args.levels
    print(
        f"torch {torch.__version__}  threads {torch.get_num_threads()}"
        f" (cores available: {default_threads()}); {args.clock}-clock time"
    )
    print(
        f"LeNet-300-100 on fashion_mnist ({len(bench.data.y_train)} train examples), Adam lr"
        f" {LR}, batch {BATCH}; IMP masks: 20% of each hidden layer, 10% of the output per level"
    )
    if bench.sparselab is None:
        print(f"sparselab: not available ({bench.sparselab_missing}); its column is left empty")
    else:
        print(f"sparselab {getattr(bench.sparselab, '__version__', '?')}")
    print(
        f"{args.rounds} rounds x {args.steps} steps per (level, method), after {args.warmup}"
        " warm-up steps each; order rotates per round"
    )
    methods = [m for m in METHODS if m != "sparselab" or bench.sparselab is not None]
    if args.warmup:
        for level in levels:
            for m in methods:
                bench.block(level, m, max(args.warmup, 2))

    times: dict[tuple[int, str], list[float]] = {(lv, m): [] for lv in levels for m in methods}
    blocks = [(lv, m) for lv in levels for m in methods]
    for r in range(args.rounds):
        shift = r * len(methods) % len(blocks) if blocks else 0
        for lv, m in blocks[shift:] + blocks[:shift]:
            times[lv, m].append(bench.block(lv, m, args.steps))

    def ratio(lv: int, m: str) -> float:
        per_round = [a / b for a, b in zip(times[lv, m], times[0, "dense"])]
        return statistics.median(per_round)

    print()
    head = f"{'level':>5} {'density':>7}  " + "  ".join(f"{m + ' ms':>12}" for m in methods)
    head += "   " + "  ".join(f"{m + '/L0':>12}" for m in methods)
    print(head)
    print("-" * len(head))
    for lv in levels:
        ms = "  ".join(f"{statistics.median(times[lv, m]) * 1e3:12.3f}" for m in methods)
        rs = "  ".join(f"{ratio(lv, m):12.3f}" for m in methods)
        print(f"{lv:5d} {bench.masks[lv].density() * 100:6.1f}%  {ms}   {rs}")
    print("\n(ms: median time per step; X/L0: per round, over the dense kernels' level 0)")
    print("auto took:")
    for lv in levels:
        print(f"  level {lv:2d}: {bench.chosen.get(lv, '?')}")
    last = levels[-1]
    density = bench.masks[last].density()
    for m in methods:
        print(f"level {last} ({density * 100:.1f}%) {m}/dense level 0: {ratio(last, m):.3f}")
    got = ratio(last, "sparse")
    flag = "ok" if got <= GOAL else "ABOVE GOAL"
    print(f"ratio sparse level {last}/dense level 0: {got:.3f} (goal <= {GOAL}) {flag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
