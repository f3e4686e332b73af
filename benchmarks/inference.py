"""Sparse inference on CPU: ticketlab's export against the ways PyTorch offers.

For each network and density, four forms of the same masked network run the same
batches in one process, and their outputs are checked equal (max abs difference at
most 1e-5 against the dense form):

  dense        plain PyTorch: the masked network, zeros stored and multiplied;
  torch-prune  ``torch.nn.utils.prune.custom_from_mask`` on every Linear/Conv2d layer
               (a forward pre-hook recomputes ``weight = weight_orig * mask``);
  naive-csr    every Linear weight replaced by ``weight.to_sparse_csr()`` (so
               ``F.linear`` computes ``x @ W_csr.T``); conv weights stay dense, since
               ``conv2d`` takes no sparse weight;
  ticketlab    ``ticketlab.export.compact`` with ``format="auto"``: dead units removed,
               biases folded, each layer dense or CSR (``W_csr @ x``, feature-major),
               whichever timed faster at *that* batch size (one export per batch size,
               as ``ticketlab export --batch-size B`` makes it).

Networks (Fashion-MNIST inputs, 1x28x28; random inputs where it is not installed):

  lenet_300_100 at 90%, 98% and 99% sparsity: magnitude masks of a briefly trained net
               (``--train-steps`` Adam steps, lr 1.2e-3, batch 60), every layer pruned
               to the same density (``ticketlab.prune``, layerwise); not retrained, as
               only speed and equality are measured;
  conv4 at 98%: a magnitude mask of the network at initialisation (no training: for
               i.i.d. initial weights this is a random mask with the same density in
               every layer).

Timing: ``torch.set_num_threads(--threads)`` (1 by default), under
``torch.no_grad`` (``F.linear`` with a CSR weight fails under
``torch.inference_mode``). Each form is warmed up, then the four alternate over
``--rounds`` rounds (their order rotating); in a round each form runs enough calls back
to back to last ``--min-time`` seconds and the time per call is taken. Reported: the
median per call and the median over rounds of dense/form within a round (pairs timed
close together cancel a shared machine's drifts). ``--clock cpu`` times this process's
CPU time instead of wall time (less disturbed by other processes, needs one thread).

Goal: for the 98% LeNet, ticketlab >= 5x dense at batch 256 and >= 2x at batch 1, on
one thread. Wall-clock figures need an idle machine.

Run: ``python benchmarks/inference.py [--rounds R] [--threads T] [--clock wall|cpu]
[--networks lenet,conv4] [--batches 1,256]``;
``--quick`` is a smoke run (tiny sizes, meaningless times).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import prune as torch_prune

import ticketlab
from ticketlab.errors import DataError
from ticketlab.export import TOLERANCE, compact

SHAPE = (1, 28, 28)
LENET_SPARSITIES = (0.90, 0.98, 0.99)
CONV_SPARSITY = 0.98
GOALS = {1: 2.0, 256: 5.0}  # 98% LeNet: ticketlab over dense, by batch size
METHODS = ("dense", "torch-prune", "naive-csr", "ticketlab")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds per case (7)")
    p.add_argument("--min-time", type=float, default=0.05, help="seconds per timing (0.05)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    p.add_argument("--batches", default="1,256", help="batch sizes, comma list (1,256)")
    p.add_argument("--train-steps", type=int, default=500, help="LeNet training steps (500)")
    p.add_argument("--conv-width", type=float, default=1.0, help="conv4 width multiplier (1)")
    p.add_argument("--networks", default="lenet,conv4", help="which: lenet, conv4 (both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny sizes and budgets")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.min_time, args.train_steps = 2, 0.002, 20
        args.batches, args.conv_width = "1,8", 0.125
    args.batches = [int(b) for b in args.batches.split(",") if b.strip()]
    args.networks = {n.strip() for n in args.networks.split(",") if n.strip()}
    if not args.networks or not args.networks <= {"lenet", "conv4"}:
        p.error("--networks is a comma list of lenet, conv4")
    if args.rounds < 1 or args.threads < 1 or min(args.batches) < 1:
        p.error("--rounds, --threads and the batch sizes must be >= 1")
    if args.clock == "cpu" and args.threads != 1:
        p.error("--clock cpu needs --threads 1 (other threads' waiting counts as CPU time)")
    return args


# the networks ----------------------------------------------------------------------------


def load_inputs(seed: int):
    """Fashion-MNIST (train, labels, test) or random stand-ins, and what they are."""
    try:
        d = ticketlab.data.load("fashion_mnist")
        return d.x_train, d.y_train, d.x_test[:512], "fashion_mnist"
    except DataError:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(6000, *SHAPE, generator=g)
        y = torch.randint(0, 10, (6000,), generator=g)
        return x, y, torch.randn(512, *SHAPE, generator=g), "random inputs (no fashion_mnist)"


def train_briefly(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1.2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (60,), generator=g)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def masked(model: nn.Module, sparsity: float) -> tuple[nn.Module, ticketlab.Mask]:
    """A copy of ``model`` with a layerwise magnitude mask at ``sparsity`` applied."""
    net = copy.deepcopy(model).eval()
    mask = ticketlab.prune(net, ticketlab.Mask.dense(net), fraction=sparsity, scope="layerwise")
    mask.apply_(net)
    return net, mask


def with_torch_prune(model: nn.Module, mask: ticketlab.Mask) -> nn.Module:
    net = copy.deepcopy(model)
    modules = dict(net.named_modules())
    for name, m in mask.items():
        mod_name, _, pname = name.rpartition(".")
        torch_prune.custom_from_mask(modules[mod_name], pname, m.float())
    return net.eval()


def with_naive_csr(model: nn.Module) -> nn.Module:
    net = copy.deepcopy(model)
    with warnings.catch_warnings():  # torch: "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        for m in net.modules():
            if isinstance(m, nn.Linear):
                m.weight = nn.Parameter(m.weight.detach().to_sparse_csr(), requires_grad=False)
    return net.eval()


# timing ----------------------------------------------------------------------------------


def per_call(fn, x, min_time: float, clock) -> float:
    """Seconds per call of ``fn(x)``, over enough calls to last ``min_time``."""
    n, t0 = 0, clock()
    while True:
        fn(x)
        n += 1
        elapsed = clock() - t0
        if elapsed >= min_time:
            return elapsed / n


@torch.no_grad()
def time_case(nets: dict[str, nn.Module], x: torch.Tensor, args) -> dict[str, list[float]]:
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    for net in nets.values():
        for _ in range(3):
            net(x)
    times = {k: [] for k in nets}
    names = list(nets)
    for r in range(args.rounds):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            times[k].append(per_call(nets[k], x, args.min_time, clock))
    return times


@torch.no_grad()
def max_diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    return float((a(x).double() - b(x).double()).abs().max())


def run_case(label, dense_net, mask, x_check, batches, args, rows, problems) -> None:
    nets_common = {
        "dense": dense_net,
        "torch-prune": with_torch_prune(dense_net, mask),
        "naive-csr": with_naive_csr(dense_net),
    }
    for b in batches:
        exported = compact(dense_net, SHAPE, format="auto", batch_size=b)
        nets = {**nets_common, "ticketlab": exported}
        for k, net in nets.items():
            d = max_diff(net, dense_net, x_check)
            if not d <= TOLERANCE:
                problems.append(f"{label} batch {b}: {k} differs from dense by {d:.3g}")
        xb = x_check[torch.arange(b) % len(x_check)]
        times = time_case(nets, xb, args)
        med = {k: statistics.median(v) for k, v in times.items()}
        ratio = {
            k: statistics.median(d / t for d, t in zip(times["dense"], times[k])) for k in nets
        }
        rows.append((label, b, med, ratio, exported))


def describe(exported) -> str:
    units = exported.manifest["units"]
    kept = ", ".join(f"{g} {k}/{n}" for g, (k, n) in units.items() if g != "output")
    fmts = ", ".join(f"{n} {f}" for n, f in exported.formats.items())
    return f"units kept: {kept}; formats: {fmts}"


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, source = load_inputs(args.seed)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.clock} clock; "
        f"inputs: {source}; {args.rounds} rounds, >= {args.min_time * 1e3:g} ms per timing"
    )
    rows, problems = [], []

    if "lenet" in args.networks:
        lenet = ticketlab.models.build("lenet_300_100", SHAPE, 10, seed=args.seed)
        train_briefly(lenet, x_train, y_train, args.train_steps, args.seed)
        print(f"lenet_300_100: {args.train_steps} Adam steps, then layerwise magnitude masks")
        for s in LENET_SPARSITIES:
            net, mask = masked(lenet, s)
            label = f"lenet_300_100 {s:.0%}"
            run_case(label, net, mask, x_test, args.batches, args, rows, problems)
    if "conv4" in args.networks:
        conv = ticketlab.models.build("conv4", SHAPE, 10, width=args.conv_width, seed=args.seed)
        print(f"conv4 (width {args.conv_width:g}): magnitude mask at initialisation (random-like)")
        net, mask = masked(conv, CONV_SPARSITY)
        label = f"conv4 {CONV_SPARSITY:.0%}"
        run_case(label, net, mask, x_test[:64], args.batches, args, rows, problems)

    print()
    head = f"{'network':<20} {'batch':>5}  " + "  ".join(f"{m:>19}" for m in METHODS)
    print(head)
    print(" " * 28 + "  ".join(f"{'us/call (x dense)':>19}" for _ in METHODS))
    print("-" * len(head))
    for label, b, med, ratio, _ in rows:
        cells = "  ".join(f"{med[m] * 1e6:10.1f} ({ratio[m]:5.2f}x)" for m in METHODS)
        print(f"{label:<20} {b:>5}  {cells}")
    print()
    for label, b, _, _, exported in rows:
        print(f"{label} batch {b}: {describe(exported)}")
    print()
    for label, b, _, ratio, _ in rows:
        if label == "lenet_300_100 98%" and b in GOALS:
            ok = "met" if ratio["ticketlab"] >= GOALS[b] else "NOT met"
            print(
                f"goal lenet_300_100 98% batch {b}: ticketlab {ratio['ticketlab']:.2f}x dense "
                f"(goal >= {GOALS[b]:g}x): {ok}"
            )
    if problems:
        print("OUTPUT MISMATCH:\n  " + "\n  ".join(problems))
        return 1
    print(f"all outputs equal to {TOLERANCE:g} (max abs difference against dense)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
