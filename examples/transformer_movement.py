"""Prune a small Transformer text classifier on synthetic token data.

Integer token ids go in as they are; the attention's Q/K/V in-projection
(``in_proj_weight``), its output projection and the feed-forward weights are made
prunable by a selection. Two ways to sparsity:

1. movement pruning (Sanh et al. 2020), as the paper uses it: while fine-tuning a trained
   network, the mask follows the accumulated movement -sum_t g_t w_t on a cubic schedule
   to the target density; magnitude pruning on the same schedule is the paper's baseline;
2. iterative magnitude pruning with rewinding to initialisation (the lottery ticket
   procedure) on the attention and feed-forward weights, from the untrained network.

Run: ``PYTHONPATH=src python examples/transformer_movement.py`` (about two minutes on two
CPU cores). Runs go to ``runs-examples/``; running again reuses them.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import ticketlab as tl
from ticketlab.methods.gradual import GradualExperiment, GradualSpec
from ticketlab.methods.lottery import LotteryExperiment

VOCAB, LENGTH, CLASSES = 32, 12, 4
# attention in-projections, attention output projections, feed-forward layers
PRUNABLE = ("attention", "*.self_attn.out_proj.weight", "*.linear1.weight", "*.linear2.weight")


class TokenClassifier(nn.Module):
    """Embedding + learned positions -> 2 TransformerEncoder layers -> mean -> Linear."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d)
        self.pos = nn.Parameter(0.1 * torch.randn(LENGTH, d))
        layer = nn.TransformerEncoderLayer(d, heads, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens) + self.pos).mean(1))


def token_data(n: int = 3000, seed: int = 0) -> tl.Dataset:
    """The class is which of four 'keyword' tokens comes first in the sequence: a task that
    needs attention over positions, not a bag of words."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(CLASSES, VOCAB, (n, LENGTH), generator=g)
    # two distinct keywords at random positions; the earlier one names the class
    kw = torch.stack([torch.randperm(CLASSES, generator=g)[:2] for _ in range(n)])
    pos = torch.stack([torch.randperm(LENGTH, generator=g)[:2] for _ in range(n)])
    rows = torch.arange(n)
    x[rows, pos[:, 0]], x[rows, pos[:, 1]] = kw[:, 0], kw[:, 1]
    y = torch.where(pos[:, 0] < pos[:, 1], kw[:, 0], kw[:, 1])
    split = int(0.8 * n)
    return tl.from_tensors(x[:split], y[:split], x[split:], y[split:], val_size=300)


def main() -> None:
    data = token_data()
    torch.manual_seed(0)
    model = TokenClassifier()
    common = dict(steps="6ep", batch_size=50, lr=1e-3, eval_every="1ep", prunable=PRUNABLE,
                  runs_dir="runs-examples", quiet=True)  # fmt: skip
    trained = copy.deepcopy(model)
    dense = tl.train(trained, data, tl.TrainSpec(**common))
    table = [("dense", 1.0, dense["test_accuracy"])]
    for density in (0.5, 0.2, 0.1):
        for criterion in ("movement", "magnitude"):
            spec = GradualSpec(criterion=criterion, density=density, frequency="10it", **common)
            (row,) = tl.run_on_module(GradualExperiment, trained, data, spec)
            table.append((criterion, row["density"], row["test_accuracy"]))
    spec = tl.LotterySpec(levels=3, prune_fraction=0.5, output_prune_fraction=0.5, **common)
    for row in tl.run_on_module(LotteryExperiment, model, data, spec):
        table.append((f"IMP level {row['level']}", row["density"], row["test_accuracy"]))
    print(f"{'method':<14} {'density %':>9} {'test acc %':>10}  (density of the pruned weights)")
    for name, density, acc in table:
        print(f"{name:<14} {100 * density:>9.1f} {100 * acc:>10.2f}")


if __name__ == "__main__":
    main()
