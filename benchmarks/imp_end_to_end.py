"""End-to-end IMP: ``ticketlab lottery`` against the loop a researcher writes by hand.

The work: iterative magnitude pruning of LeNet-300-100 on Fashion-MNIST, Adam 1.2e-3,
batch 60, ``--steps`` steps a level, ``--levels`` pruning levels after the dense level
0 (so levels + 1 trainings), 20% of the remaining weights pruned globally over the three
weight matrices per level, rewound to the initial weights.

  ticketlab  ``python -m ticketlab.cli lottery ...`` in a fresh process and a fresh
             run directory: it evaluates validation and test at its interval
             (``--eval-every``, by default its own: one epoch, so at the start, after
             916 steps and at the end of each level), scores the training set after
             each level, checkpoints every ``--checkpoint-every`` (500 steps: once in
             each level), and writes its run store (masks, weights at the start and
             end of each level, metrics, results.csv).
  reference  this script with ``--reference`` in a fresh process: reads the IDX files
             itself, trains with a plain PyTorch loop, evaluates the test set once per
             level, prunes with ``torch.nn.utils.prune.global_unstructured`` and
             rewinds ``weight_orig`` to the initial weights. It writes nothing.

Both are timed as whole processes (interpreter start, imports, data loading, training,
everything) with ``time.perf_counter`` around ``subprocess.run``; the two alternate,
their order swapping every round, and the medians and their ratio are printed, with
each process's CPU time (user + system) beside the wall time. Wall-clock figures need
a quiet machine; on a shared one, ``--threads 1`` and the CPU-time ratio disturb less.

Run: ``python benchmarks/imp_end_to_end.py [--steps 1000] [--levels 3] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LR = 1.2e-3
BATCH = 60
FRACTION = 0.2
GOAL = 1.0
FASHION = Path("/usr/share/datasets/fashion-mnist")


# the handwritten loop -------------------------------------------------------------------


def read_idx(path: Path):
    """An IDX file (gzipped) as a numpy array, the way a short script reads it."""
    import gzip

    import numpy as np

    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def reference(steps: int, levels: int, data_dir: Path, seed: int = 0) -> None:
    """Train, test once, prune 20% globally, rewind; ``levels`` times after level 0."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.utils import prune

    torch.manual_seed(seed)

    def images(name):
        x = torch.from_numpy(read_idx(data_dir / name).copy()).float().div_(255)
        return x.sub_(0.2860).div_(0.3530).unsqueeze(1)

    def labels(name):
        return torch.from_numpy(read_idx(data_dir / name).astype("int64"))

    # 5000 training examples held out for validation, as ticketlab does (unused here)
    x_train = images("train-images-idx3-ubyte.gz")[5000:]
    y_train = labels("train-labels-idx1-ubyte.gz")[5000:]
    x_test, y_test = images("t10k-images-idx3-ubyte.gz"), labels("t10k-labels-idx1-ubyte.gz")

    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 300),
        nn.ReLU(),
        nn.Linear(300, 100),
        nn.ReLU(),
        nn.Linear(100, 10),
    )
    layers = [m for m in model if isinstance(m, nn.Linear)]
    for m in layers:
        nn.init.xavier_normal_(m.weight)
        nn.init.zeros_(m.bias)
    init = {k: v.clone() for k, v in model.state_dict().items()}

    n = len(y_train)
    for level in range(levels + 1):
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
        model.train()
        perm = torch.randperm(n)
        pos = 0
        for _ in range(steps):
            if pos + BATCH > n:
                perm, pos = torch.randperm(n), 0
            idx = perm[pos : pos + BATCH]
            pos += BATCH
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            correct = sum(
                int((model(x_test[i : i + 1000]).argmax(1) == y_test[i : i + 1000]).sum())
                for i in range(0, len(y_test), 1000)
            )
        print(f"level {level}: test accuracy {correct / len(y_test):.4f}", flush=True)
        if level == levels:
            break
        prune.global_unstructured(
            [(m, "weight") for m in layers], pruning_method=prune.L1Unstructured, amount=FRACTION
        )
        with torch.no_grad():  # rewind: the surviving weights start from their initial values
            for i, m in zip((1, 3, 5), layers):
                m.weight_orig.copy_(init[f"{i}.weight"])
                m.bias.copy_(init[f"{i}.bias"])


# the comparison ---------------------------------------------------------------------------


def ticketlab_cmd(args, runs_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "ticketlab.cli", "lottery"]
    cmd += ["--model", "lenet_300_100", "--dataset", "fashion_mnist", "--init", "xavier_normal"]
    cmd += ["--optimizer", "adam", "--lr", str(LR), "--batch-size", str(BATCH)]
    cmd += ["--steps", f"{args.steps}it", "--levels", str(args.levels)]
    cmd += ["--scope", "global", "--prune-fraction", str(FRACTION)]
    cmd += ["--output-prune-fraction", str(FRACTION)]  # one fraction: all layers ranked together
    if args.eval_every:
        cmd += ["--eval-every", args.eval_every]
    if args.checkpoint_every:  # '' leaves the flag out (a version without it)
        cmd += ["--checkpoint-every", args.checkpoint_every]
    cmd += ["--runs-dir", str(runs_dir), "--quiet"]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    return cmd


def reference_cmd(args) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--reference"]
    cmd += ["--steps", str(args.steps), "--levels", str(args.levels)]
    if args.data_dir:
        cmd += ["--data-dir", str(args.data_dir)]
    return cmd


def timed(cmd: list[str], env: dict) -> tuple[float, float]:
    """Wall-clock seconds of the whole process, and its CPU seconds (user + system)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu


def check_store(run_root: Path, levels: int) -> str:
    """What the ticketlab run left on disk: results rows, weight files, bytes."""
    runs = list(run_root.glob("lottery-*"))
    assert len(runs) == 1, runs
    rows = (runs[0] / "results.csv").read_text().splitlines()[1:]
    weights = list(runs[0].glob("replicate-*/level-*/*/weights_*.safetensors"))
    assert len(rows) == levels + 1 and len(weights) == 2 * (levels + 1), (rows, weights)
    total = sum(p.stat().st_size for p in runs[0].rglob("*") if p.is_file())
    return f"{len(rows)} result rows, {len(weights)} weight files, {total / 1e6:.2f} MB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="training steps per level")
    p.add_argument("--levels", type=int, default=3, help="pruning levels after level 0")
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each")
    p.add_argument(
        "--eval-every", help="ticketlab's evaluation interval (default: its own, one epoch)"
    )
    p.add_argument(
        "--checkpoint-every",
        default="500it",
        help="ticketlab's checkpoint interval (default 500it: one checkpoint inside each level)",
    )
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both (default: unset)")
    p.add_argument("--data-dir", type=Path, help=f"Fashion-MNIST IDX files (default {FASHION})")
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.reference:
        reference(args.steps, args.levels, args.data_dir or FASHION)
        return 0

    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    src = Path(__file__).resolve().parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), env.get("PYTHONPATH")]))
    print(
        f"IMP of LeNet-300-100: {args.levels} levels after level 0, {args.steps} steps each, "
        f"global {FRACTION:.0%}; ticketlab evaluates every {args.eval_every or '1ep'}, "
        f"checkpoints every {args.checkpoint_every}"
    )
    times: dict[str, list[float]] = {"ticketlab": [], "reference": []}
    cpus: dict[str, list[float]] = {"ticketlab": [], "reference": []}
    with tempfile.TemporaryDirectory(prefix="imp-bench-") as tmp:
        for r in range(args.rounds):
            order = ["ticketlab", "reference"] if r % 2 == 0 else ["reference", "ticketlab"]
            line = []
            for which in order:
                if which == "ticketlab":
                    runs = Path(tmp) / f"runs-{r}"
                    seconds, cpu = timed(ticketlab_cmd(args, runs), env)
                    store = check_store(runs, args.levels)
                else:
                    seconds, cpu = timed(reference_cmd(args), env)
                times[which].append(seconds)
                cpus[which].append(cpu)
                line.append(f"{which} {seconds:.2f} s (cpu {cpu:.2f} s)")
            print(f"round {r + 1}: " + ", ".join(line) + f"  ({store})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    cpu = {k: statistics.median(v) for k, v in cpus.items()}
    ratio = med["ticketlab"] / med["reference"]
    print(f"median ticketlab  {med['ticketlab']:.2f} s wall, {cpu['ticketlab']:.2f} s cpu")
    print(f"median reference  {med['reference']:.2f} s wall, {cpu['reference']:.2f} s cpu")
    print(f"cpu-time ratio: {cpu['ticketlab'] / cpu['reference']:.3f}x")
    print(f"ratio ticketlab/reference: {ratio:.3f}x (goal <= {GOAL:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
