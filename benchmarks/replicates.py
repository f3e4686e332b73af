"""Replicates on one machine: sequential against ``--jobs N`` worker processes and
``--vectorize`` (the replicates as one stack in one process).

The work is the issue's: 4 replicates of IMP up to level 1 (two training phases
each) of LeNet-300-100 on Fashion-MNIST, with the command's defaults (Frankle &
Carbin's setup) and ``--steps``/``--eval-every`` as given. Each mode runs the
whole ``ticketlab lottery`` command in a fresh process and a fresh run directory,
modes alternating over ``--rounds``; the figure is the median wall time, and the
ratio is sequential / mode. The peak memory of each mode, from one more run that is
not timed, is the largest sum of PSS (proportional set size: pages the forked workers
share with the parent, such as the dataset, counted once) over the command's process
tree, polled every 50 ms from /proc.

``--jobs 1`` runs with every usable core as threads (the default), ``--jobs N``
with cores/N threads per worker, and ``--vectorize`` with every core in one process,
so the comparison is what a user gets from each flag. The memory bound of
``--vectorize`` is the sequential peak plus (K - 1) copies of one model's parameters,
gradients and Adam state, plus K - 1 batches of activations: the script prints that
bound beside the measured peak.

Run: ``python benchmarks/replicates.py [--replicates 4] [--steps 1000it]
[--rounds 3] [--jobs 2]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _tree_rss_kb(pid: int) -> int:
    """Proportional set size (kB) of ``pid`` and all its descendants, from /proc: pages
    the forked workers share with the parent (the dataset) are counted once overall."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{p}/task").iterdir():
                kids = (task / "children").read_text().split()
                stack += [int(k) for k in kids]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_once(args: list[str], poll: bool = False) -> tuple[float, int]:
    """Wall seconds of one command, and with ``poll`` its peak tree PSS (kB). Reading
    /proc takes CPU from the command, so timed rounds do not poll; one more round per
    mode measures the memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while proc.poll() is None:
        if poll:
            peak = max(peak, _tree_rss_kb(proc.pid))
        time.sleep(0.05)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {proc.stderr.read().decode()}")
    return seconds, peak


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicates", type=int, default=4)
    p.add_argument("--steps", default="1000it")
    p.add_argument("--eval-every", default="500it")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    base = [sys.executable, "-m", "ticketlab.cli", "lottery", "--levels", "1", "--quiet"]
    base += ["--replicates", str(a.replicates), "--steps", a.steps, "--eval-every", a.eval_every]
    modes = {
        "sequential": ["--jobs", "1"],
        f"--jobs {a.jobs}": ["--jobs", str(a.jobs)],
        "--vectorize": ["--vectorize"],
    }
    times: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, int] = {m: 0 for m in modes}
    root = Path(tempfile.mkdtemp(prefix="tl-replicates-"))
    try:
        run_once([*base, "--steps", "10it", "--runs-dir", str(root / "warm")])  # data cache
        for k in range(a.rounds):
            order = list(modes) if k % 2 == 0 else list(reversed(modes))
            for m in order:
                out = root / f"{m.replace(' ', '')}-{k}"
                s, _ = run_once([*base, *modes[m], "--runs-dir", str(out)])
                times[m].append(s)
        for m in modes:
            out = root / f"{m.replace(' ', '')}-memory"
            _, peaks[m] = run_once([*base, *modes[m], "--runs-dir", str(out)], poll=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seq = statistics.median(times["sequential"])
    print(f"{a.replicates} replicates of IMP level 1, LeNet-300-100, Fashion-MNIST, {a.steps}")
    print(f"usable cores: {len(os.sched_getaffinity(0))}")
    print(f"{'mode':<14}{'median s':>10}{'vs sequential':>15}{'peak PSS MB':>13}")
    for m in modes:
        med = statistics.median(times[m])
        print(f"{m:<14}{med:>10.2f}{seq / med:>14.2f}x{peaks[m] / 1024:>13.0f}")
    ratio = peaks[f"--jobs {a.jobs}"] / max(peaks["sequential"], 1)
    print(f"memory: --jobs {a.jobs} uses {ratio:.2f}x the sequential peak (bound {a.jobs}.10x)")
    # LeNet-300-100: parameters, gradients and Adam's two moments, float32
    n_params = 784 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
    per_copy = 4 * n_params * 4 + 4 * 60 * (784 + 300 + 100 + 10) * 2
    bound = peaks["sequential"] * 1024 + (a.replicates - 1) * per_copy
    print(
        f"memory: --vectorize peak {peaks['--vectorize'] / 1024:.0f} MB, bound "
        f"{bound / 2**20:.0f} MB (sequential + {a.replicates - 1} x {per_copy / 2**20:.1f} MB)"
    )


if __name__ == "__main__":
    main()
