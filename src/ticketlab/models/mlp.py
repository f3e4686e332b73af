"""Fully connected networks (LeNet-300-100 and its relatives)."""

from __future__ import annotations

import math
from collections.abc import Callable

from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then a Linear output layer `fc`.

    ``activation`` (a factory ``fn(shape_of_layer_output) -> nn.Module``, e.g. a
    k-winners layer) replaces the ReLUs; the modules live in ``acts``.
    """

    def __init__(
        self,
        input_shape: tuple,
        num_classes: int,
        hidden: list[int],
        activation: Callable[[tuple], nn.Module] | None = None,
    ):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = (
            None if activation is None else nn.ModuleList(activation((h,)) for h in sizes[1:])
        )
        self.fc = nn.Linear(sizes[-1], num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        return self.fc(hidden_forward(x.flatten(1), self.hidden, self.acts))


def hidden_forward(x, layers, acts):
    """Linear layers each followed by ReLU, or by the module of ``acts`` at its index."""
    for i, layer in enumerate(layers):
        x = layer(x)
        x = x.relu() if acts is None else acts[i](x)
    return x
