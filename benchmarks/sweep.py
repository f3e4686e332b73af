"""A 12-point sweep three ways: sequential, ``--executor local --jobs 2``, and Ray.

The sweep is a criteria comparison as a user writes it: ``ticketlab prune`` of
LeNet-300-100 on Fashion-MNIST, criterion (magnitude, snip, synflow) x sparsity
(0.9, 0.98) x seed (0, 1), each point trained ``--steps`` iterations with the
command's defaults. Each mode is the whole ``ticketlab sweep`` command in a fresh
process and a fresh runs directory (so nothing is skipped), timed end to end; the
ratio is sequential / mode. Ray starts a local instance with every usable core
(``cpus = 1`` per point), and its start-up is part of its time, as a user pays it.

Run: ``python benchmarks/sweep.py [--steps 300it] [--jobs 2]``.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SWEEP = """command = "prune"
[flags]
steps = "{steps}"
eval-every = "{steps}"
runs-dir = "{runs}"
[grid]
criterion = ["magnitude", "snip", "synflow"]
sparsity = [0.9, 0.98]
seed = [0, 1]
[resources]
cpus = 1
"""


def timed(args: list[str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"sweep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", default="300it")
    p.add_argument("--jobs", type=int, default=2)
    a = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tl-sweep-"))
    modes = {
        "sequential": ["--jobs", "1"],
        f"local --jobs {a.jobs}": ["--jobs", str(a.jobs)],
        "ray": ["--executor", "ray"],
    }
    try:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            del modes["ray"]
            print("ray is not installed: pip install 'ticketlab[ray]' to time it")
        times = {}
        for k, (name, flags) in enumerate(modes.items()):
            f = root / f"sweep{k}.toml"
            f.write_text(SWEEP.format(steps=a.steps, runs=root / f"runs{k}"))
            times[name] = timed([sys.executable, "-m", "ticketlab.cli", "sweep", str(f), *flags])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    seq = times["sequential"]
    print(f"12-point prune sweep, LeNet-300-100, Fashion-MNIST, {a.steps} per point")
    print(f"{'mode':<18}{'seconds':>10}{'vs sequential':>16}")
    for name, s in times.items():
        print(f"{name:<18}{s:>10.1f}{seq / s:>15.2f}x")


if __name__ == "__main__":
    main()
