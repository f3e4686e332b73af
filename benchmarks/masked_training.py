"""Masked training throughput: ticketlab.train against plain PyTorch loops.

Trains LeNet-300-100 on Fashion-MNIST (Adam, lr 1.2e-3, batch 60) three ways in one
process, on the same work (same steps, batch size, in-memory data and batch order):

  ticketlab    ``ticketlab.train`` with a 20%-density magnitude mask (kept by
               ``MaskKeeper``: one ``_foreach_mul_`` after every optimizer step);
  plain        a plain PyTorch loop, no mask: the speed to match;
  torch-prune  the plain loop with the same mask through ``torch.nn.utils.prune``
               (``custom_from_mask``: a forward pre-hook recomputes each weight).

Each method is warmed up, then the methods alternate over several rounds (their order
rotating from round to round) and the median steps/second of each is reported.

Timing. The plain loops time their step loop with ``time.perf_counter`` (synchronising
the device at both ends). For ticketlab the figure is ``train_seconds`` from the result
of ``ticketlab.train``, which times its step loop. That loop also evaluates the
validation and test splits at its last step, so ``train()`` is given a copy of the
dataset whose validation and test splits hold one example each: the timed evaluation
then costs ~nothing (and still synchronises the device), and the training data are the
very tensors the plain loops use. What a full evaluation would add is measured apart and
printed. Outside the timed loop ``train()`` also builds its optimizer, zeroes the pruned
weights once, evaluates at step 0 and scores the training set; none of that is counted.

Wall-clock figures need an idle machine: with two threads on two cores any other busy
process slows the loops many-fold and unevenly. Around each timed run the script reads
``/proc/stat``; rounds in which other processes kept more than ``--max-other-load`` cores
busy are marked and left out of the medians (while any round is clean). On a shared
machine, ``--threads 1 --clock cpu`` times this process's CPU time instead (for ticketlab:
the CPU time of ``train()`` for N steps less that of a 1-step call, over N - 1 steps).

Run: ``python benchmarks/masked_training.py [--steps N] [--rounds R] [--threads T]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import ticketlab
from ticketlab.data.batching import epoch_seed

LR = 1.2e-3
BATCH = 60
GOAL = 0.98


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000, help="timed steps per round (2000)")
    p.add_argument("--rounds", type=int, default=4, help="rounds of the three methods (4)")
    p.add_argument("--warmup", type=int, default=200, help="untimed steps per method first")
    p.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: cores)"
    )
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall (default): elapsed time; cpu: this process's CPU time, far less disturbed"
        " by other processes on a shared machine (needs --threads 1 and --device cpu)",
    )
    p.add_argument("--density", type=float, default=0.2, help="kept fraction of weights (0.2)")
    p.add_argument("--seed", type=int, default=0, help="init and data-order seed (0)")
    p.add_argument(
        "--max-other-load",
        type=float,
        default=0.1,
        help="rounds in which other processes kept more cores busy are left out of the medians"
        " while at least one round stays under it (0.1)",
    )
    args = p.parse_args(argv)
    if args.steps < 1 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps, --rounds and --threads must be >= 1, --warmup >= 0")
    if not 0.0 < args.density <= 1.0:
        p.error("--density must be in (0, 1]")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available in this torch build / machine")
    if args.clock == "cpu" and (args.threads != 1 or args.device != "cpu"):
        # With more threads, CPU time also counts OpenMP workers spinning while they wait.
        p.error("--clock cpu needs --threads 1 and --device cpu")
    if args.clock == "cpu" and args.steps < 2:
        p.error("--clock cpu needs --steps >= 2")
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


class LoadMonitor:
    """How many cores *other* processes kept busy while we ran: a noise warning."""

    def __enter__(self):
        self.busy0, self.own0, self.t0 = cpu_busy_seconds(), time.process_time(), time.time()
        return self

    def __exit__(self, *exc):
        busy1, own1 = cpu_busy_seconds(), time.process_time()
        wall = time.time() - self.t0
        self.other_cores = None
        if self.busy0 is not None and busy1 is not None and wall > 0:
            other = (busy1 - self.busy0) - (own1 - self.own0)
            self.other_cores = max(other, 0.0) / wall
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# the plain loop ------------------------------------------------------------


def plain_loop(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    steps: int,
    seed: int,
    clock=time.perf_counter,
) -> float:
    """Adam on ``steps`` batches from step 0; returns the seconds of the step loop.

    Batch order as ticketlab's: a seeded ``randperm`` per epoch (same seeds), sliced.
    """
    device = x_train.device
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    n = len(y_train)
    per_epoch = n // BATCH
    model.train()
    perm, epoch = None, -1
    sync(device)
    t0 = clock()
    for step in range(steps):
        e, i = divmod(step, per_epoch)
        if e != epoch:
            gen = torch.Generator().manual_seed(epoch_seed(seed, e))
            perm, epoch = torch.randperm(n, generator=gen), e
        idx = perm[i * BATCH : (i + 1) * BATCH].to(device)
        x, y = x_train[idx], y_train[idx]
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return clock() - t0


# the three methods ---------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.device = torch.device(args.device)
        data = ticketlab.data.load("fashion_mnist")
        dev = self.device
        self.data = dataclasses.replace(
            data,
            x_train=data.x_train.to(dev),
            y_train=data.y_train.to(dev),
            x_val=data.x_val.to(dev),
            y_val=data.y_val.to(dev),
            x_test=data.x_test.to(dev),
            y_test=data.y_test.to(dev),
        )
        # What train() gets: the same training tensors; evaluation splits cut to one example.
        self.data_1eval = dataclasses.replace(
            self.data,
            x_val=self.data.x_val[:1],
            y_val=self.data.y_val[:1],
            x_test=self.data.x_test[:1],
            y_test=self.data.y_test[:1],
        )
        model = self.fresh_model()  # built from the seed: every call gives the same weights
        mask = ticketlab.Mask.dense(model)
        if args.density < 1.0:
            mask = ticketlab.prune(model, mask, fraction=1.0 - args.density)
        self.mask = mask

    def fresh_model(self) -> nn.Module:
        d = self.data
        model = ticketlab.models.build(
            "lenet_300_100", d.input_shape, d.num_classes, init="xavier_normal", seed=self.args.seed
        )
        return model.to(self.device)

    def spec(self, steps: int) -> ticketlab.Spec:
        return ticketlab.Spec(
            steps=f"{steps}it",
            optimizer="adam",
            lr=LR,
            batch_size=BATCH,
            eval_every=f"{steps}it",
            seed=self.args.seed,
        )

    def run_ticketlab(self, steps: int) -> tuple[float, nn.Module]:
        """Steps per second of ``ticketlab.train`` and the trained model."""
        model = self.fresh_model()
        if self.args.clock == "wall":
            out = ticketlab.train(model, self.data_1eval, self.spec(steps), mask=self.mask)
            return steps / out["train_seconds"], model
        # CPU time: train() is timed whole, so take off what a 1-step call costs (optimizer,
        # mask, evaluations, one step): what is left is the other steps - 1 steps.
        if steps < 2:
            raise ValueError("--clock cpu needs --steps >= 2")  # parse_args checks this
        t0 = time.process_time()
        ticketlab.train(model, self.data_1eval, self.spec(steps), mask=self.mask)
        t1 = time.process_time()
        ticketlab.train(self.fresh_model(), self.data_1eval, self.spec(1), mask=self.mask)
        t2 = time.process_time()
        return (steps - 1) / ((t1 - t0) - (t2 - t1)), model

    def plain(self, model: nn.Module, steps: int) -> float:
        d = self.data
        clock = time.process_time if self.args.clock == "cpu" else time.perf_counter
        return steps / plain_loop(model, d.x_train, d.y_train, steps, self.args.seed, clock)

    def run_plain(self, steps: int) -> tuple[float, nn.Module]:
        model = self.fresh_model()
        return self.plain(model, steps), model

    def run_torch_prune(self, steps: int) -> tuple[float, nn.Module]:
        model = self.fresh_model()
        # Prune the model's weights (those named in the mask; no bias) by the same mask.
        modules = dict(model.named_modules())
        for name, m in self.mask.items():
            mod_name, _, pname = name.rpartition(".")
            torch_prune.custom_from_mask(modules[mod_name], pname, m.to(self.device, torch.float32))
        return self.plain(model, steps), model

    def eval_seconds(self, model: nn.Module, reps: int = 3) -> float:
        """Median time of what train() evaluates at its last step (val + test)."""
        d = self.data
        times = []
        for _ in range(reps):
            sync(self.device)
            t0 = time.perf_counter()
            ticketlab.evaluate(model, d.x_val, d.y_val, 1000)
            ticketlab.evaluate(model, d.x_test, d.y_test, 1000)
            sync(self.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def test_accuracy(self, model: nn.Module) -> float:
        return ticketlab.evaluate(model, self.data.x_test, self.data.y_test, 1000)[1]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    methods = {
        "ticketlab": bench.run_ticketlab,
        "plain": bench.run_plain,
        "torch-prune": bench.run_torch_prune,
    }
    names = list(methods)

    print(
        f"torch {torch.__version__}  device {bench.device}  threads {torch.get_num_threads()}"
        f" (cores available: {default_threads()})"
    )
    print(
        f"LeNet-300-100 on fashion_mnist ({len(bench.data.y_train)} train examples), Adam lr {LR},"
        f" batch {BATCH}; mask density {bench.mask.density():.3f}"
    )
    print(
        f"{args.rounds} rounds x {args.steps} steps per method, after {args.warmup} warm-up"
        f" steps each; order rotates per round; {args.clock}-clock time"
    )

    if args.warmup:
        for name in names:
            methods[name](args.warmup)

    rates: dict[str, list[float]] = {n: [] for n in names}
    noisy: list[bool] = []  # per round: did other processes use the cores meanwhile?
    loads: list[float] = []
    last: dict[str, nn.Module] = {}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        round_noisy = False
        for name in order:
            with LoadMonitor() as load:
                rate, model = methods[name](args.steps)
            rates[name].append(rate)
            last[name] = model
            if load.other_cores is not None:
                loads.append(load.other_cores)
                round_noisy |= load.other_cores > args.max_other_load
        # CPU time barely notices other processes: keep every round.
        noisy.append(round_noisy and args.clock == "wall")

    clean = [r for r in range(args.rounds) if not noisy[r]]
    used = clean or list(range(args.rounds))
    med = {n: statistics.median(v[r] for r in used) for n, v in rates.items()}
    acc = {n: bench.test_accuracy(m) for n, m in last.items()}
    eval_s = bench.eval_seconds(last["plain"])

    print()
    head = f"{'method':<12} {'median it/s':>11} {'vs plain':>8} {'test acc':>8}   per round it/s"
    print(head)
    print("-" * len(head))
    for n in names:
        rounds = " ".join(f"{v:6.0f}{'*' if noisy[r] else ' '}" for r, v in enumerate(rates[n]))
        print(f"{n:<12} {med[n]:11.0f} {med[n] / med['plain']:8.3f} {acc[n]:8.4f}   {rounds}")
    per_round = [t / p for t, p in zip(rates["ticketlab"], rates["plain"])]
    print(f"{'ticketlab/plain per round':<45}   " + " ".join(f"{v:6.3f} " for v in per_round))
    print()
    how = (
        "train_seconds of ticketlab.train (its step loop)"
        if args.clock == "wall"
        else "CPU time of train(N steps) - train(1 step), over N - 1 steps"
    )
    print(
        f"ticketlab: {how}; its end-of-loop val+test evaluation,\n  excluded here by"
        f" 1-example eval splits, would add {eval_s * 1e3:.0f} ms per call"
        f" (= {eval_s / (args.steps / med['ticketlab']) * 100:.1f}% of a timed run)."
    )
    if loads:
        print(
            f"other processes' load during the timed runs: median {statistics.median(loads):.2f},"
            f" max {max(loads):.2f} cores (of {os.cpu_count()})"
        )
    if not clean:
        print(
            f"WARNING: in every round other processes used > {args.max_other_load} cores; the"
            " figures are noisy (threads competing for cores). Rerun on an idle machine."
        )
    elif len(clean) < args.rounds:
        print(
            f"* rounds where other processes used > {args.max_other_load} cores: left out of"
            f" the medians ({len(clean)} of {args.rounds} rounds used)"
        )
    ratio = med["ticketlab"] / med["plain"]
    print(f"ratio torch-prune/plain: {med['torch-prune'] / med['plain']:.3f}")
    print(f"ratio ticketlab/plain: {ratio:.3f} (goal >= {GOAL})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
