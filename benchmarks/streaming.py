"""Training from an image folder read by DataLoader workers, against the same images in memory.

Writes the first N Fashion-MNIST training images as 28x28 PNG files in the
``train/<class>/`` layout (and a few test images in ``val/``), then trains on the same
work both ways, each in a fresh process:

  memory     ``ticketlab.train`` on the decoded images as in-memory tensors (the same
             pixels, the same standardisation): the speed to match;
  folder     ``ticketlab.train`` on ``load("imagefolder", workers=W)``: PNG decoding
             (and, with ``--augment``, the random-resized crop and flip) in W worker
             processes, the batches in the same order.

For each it prints the median step time over ``--rounds`` alternating rounds, the
examples per second, the folder run's time waiting for data and its overhead (step time
folder / memory; goal <= 1.3 for conv4 with 2 workers), and the peak resident memory of
the training process (and, for the folder, of its largest worker) at 1x and 10x the
images. The folder's peak should not grow with the images on disk; the in-memory one
does. Both runs use one intra-op thread, so the workers have cores of their own.

Run: ``python benchmarks/streaming.py [--images N] [--model conv4] [--workers 2]``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GOAL = 1.3


def write_folder(root: Path, n: int, n_val: int = 50) -> None:
    """The first ``n`` training and ``n_val`` test images as PNG files, by class."""
    from PIL import Image

    from ticketlab.data import sources

    x_train, y_train, x_test, y_test = sources.read_idx_dataset("fashion_mnist", None, True)
    x_train, y_train, x_test = x_train.numpy(), y_train.numpy(), x_test.numpy()
    for split, xs, ys, count in (("train", x_train, y_train, n), ("val", x_test, y_test, n_val)):
        for c in range(10):
            (root / split / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            j = i % len(xs)
            Image.fromarray(np.asarray(xs[j], dtype=np.uint8).reshape(28, 28)).save(
                root / split / str(int(ys[j])) / f"{i:06d}.png"
            )  # beyond the 60,000 training images the set repeats


def peak_rss_mib() -> tuple[float, float]:
    """Peak resident memory (MiB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, kids


def child(args) -> None:
    """One measurement, in this fresh process: prints a JSON line."""
    import ticketlab as tl
    from ticketlab.data import load

    torch.set_num_threads(1)
    root = Path(args.root)
    folder = load("imagefolder", str(root), val_size=0, workers=args.workers,
                  augment=args.augment)  # fmt: skip
    steps = f"{args.steps}it"
    # evaluation in training-sized batches, so the peak memory is the data's, not that of
    # a 1000-example evaluation batch
    spec = tl.TrainSpec(steps=steps, batch_size=args.batch, eval_every=steps, kernels="dense",
                        checkpoint_seconds=0, eval_batch_size=args.batch)  # fmt: skip
    if args.child == "memory":
        # the same pixels and standardisation, decoded once into tensors
        train, test = folder.train, folder.test
        xs = torch.stack([train[i][0] for i in range(len(train))])
        ys = torch.tensor([train[i][1] for i in range(len(train))])
        xt = torch.stack([test[i][0] for i in range(len(test))])
        yt = torch.tensor([test[i][1] for i in range(len(test))])
        data = tl.from_tensors(xs, ys, xt, yt, num_classes=10)
    else:
        data = folder
    model = tl.models.build(args.model, (1, 28, 28), 10, seed=0)
    with tempfile.TemporaryDirectory() as work:
        t0 = time.perf_counter()
        out = tl.train(model, data, spec, workdir=work)
        wall = time.perf_counter() - t0
        rows = [json.loads(s) for s in (Path(work) / "metrics.jsonl").read_text().splitlines()]
    own, kids = peak_rss_mib()
    print(json.dumps({
        "step_ms": 1000 * out["train_seconds"] / args.steps,
        "examples_per_second": args.steps * args.batch / out["train_seconds"],
        "data_wait_s": rows[-1].get("data_wait_seconds", 0.0),
        "wall_s": wall,
        "rss_mib": own,
        "worker_rss_mib": kids,
    }))  # fmt: skip


def measure(mode: str, root: Path, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--root",
        str(root),
        "--model",
        args.model,
        "--steps",
        str(args.steps),
        "--batch",
        str(args.batch),
        "--workers",
        str(args.workers),
    ]
    if args.augment:
        cmd.append("--augment")  # fmt: skip
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=src)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=3000, help="training images at 1x")
    p.add_argument("--model", default="conv4")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=60)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--augment", action="store_true", help="random-resized crop and flip too")
    p.add_argument("--child", choices=("memory", "folder"))
    p.add_argument("--root")
    args = p.parse_args()
    if args.child:
        return child(args)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    with tempfile.TemporaryDirectory() as tmp:
        results: dict = {}
        for scale in (1, 10):
            root = Path(tmp) / f"x{scale}"
            t0 = time.perf_counter()
            write_folder(root, args.images * scale)
            print(f"wrote {args.images * scale} PNGs in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)  # fmt: skip
            rounds = args.rounds if scale == 1 else 1
            for r in range(rounds):
                order = ("memory", "folder") if r % 2 == 0 else ("folder", "memory")
                for mode in order:
                    results.setdefault((scale, mode), []).append(measure(mode, root, args))
    print(f"{args.model}, batch {args.batch}, {args.steps} steps, {args.workers} workers, "
          f"augment {'on' if args.augment else 'off'}, 1 intra-op thread; median of "
          f"{args.rounds} rounds at 1x")  # fmt: skip
    head = f"{'images':>7} {'data':>7} {'step ms':>8} {'ex/s':>7} {'wait s':>7} {'RSS MiB':>8}"
    print(head + f" {'worker MiB':>10}")
    for (scale, mode), runs in sorted(results.items()):
        med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        worker = f"{med['worker_rss_mib']:>10.0f}" if mode == "folder" else f"{'':>10}"
        print(f"{args.images * scale:>7} {mode:>7} {med['step_ms']:>8.2f} "
              f"{med['examples_per_second']:>7.0f} {med['data_wait_s']:>7.2f} "
              f"{med['rss_mib']:>8.0f} {worker}")  # fmt: skip
    mem = statistics.median(r["step_ms"] for r in results[(1, "memory")])
    fol = statistics.median(r["step_ms"] for r in results[(1, "folder")])
    ratio = fol / mem
    print(f"overhead folder/memory step time at 1x: {ratio:.2f} (goal <= {GOAL}: "
          f"{'met' if ratio <= GOAL else 'not met'})")  # fmt: skip


if __name__ == "__main__":
    main()
