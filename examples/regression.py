"""Iterative magnitude pruning of an MLP with a mean-squared-error objective.

The targets are real values (``targets="values"``), the loss is ``F.mse_loss`` and the
metrics a user's function (mean absolute error and R^2) in place of accuracy; the best
step is the one with the lowest validation MAE. Run:
``PYTHONPATH=src python examples/regression.py`` (under a minute on two CPU cores).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import ticketlab as tl
from ticketlab.methods.lottery import LotteryExperiment


def regression_metrics(outputs: torch.Tensor, targets: torch.Tensor) -> dict:
    """Batch means: absolute error, and the squared error over the targets' variance."""
    err = outputs - targets
    return {"mae": err.abs().mean(), "rel_mse": err.pow(2).mean() / targets.var()}


def make_data(n: int = 4000, seed: int = 0) -> tl.Dataset:
    """y = sin(3 x0) + x1 x2 - 0.5 x3^2 + noise, from 8 inputs of which 4 matter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(3 * x[:, 0]) + x[:, 1] * x[:, 2] - 0.5 * x[:, 3] ** 2
    y = (y + 0.05 * torch.randn(n, generator=g))[:, None]
    split = int(0.8 * n)
    return tl.from_tensors(x[:split], y[:split], x[split:], y[split:], val_size=400,
                           targets="values")  # fmt: skip


def main() -> None:
    data = make_data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, 1))  # fmt: skip
    spec = tl.LotterySpec(steps="15ep", batch_size=50, lr=1e-3, eval_every="1ep", levels=6,
                          prune_fraction=0.5, output_prune_fraction=0.2, loss_fn=F.mse_loss,
                          metrics_fn=regression_metrics, select="min:val_mae",
                          runs_dir="runs-examples", quiet=True)  # fmt: skip
    rows = tl.run_on_module(LotteryExperiment, model, data, spec)
    print(f"{'level':>5} {'density %':>9} {'test MSE':>9} {'test MAE':>9} {'at best MAE':>11}")
    for r in rows:
        print(f"{r['level']:>5} {100 * r['density']:>9.1f} {r['test_loss']:>9.4f} "
              f"{r['test_mae']:>9.4f} {r['test_mae_at_best_val']:>11.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
