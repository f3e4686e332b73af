"""Fully connected networks (LeNet-300-100 and its relatives)."""

from __future__ import annotations

import math

from torch import nn


class MLP(nn.Module):
    """Flatten, then Linear+ReLU per hidden width, then a Linear output layer `fc`."""

    def __init__(self, input_shape: tuple, num_classes: int, hidden: list[int]):
        super().__init__()
        sizes = [math.prod(input_shape), *hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.fc = nn.Linear(sizes[-1], num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.hidden:
            x = layer(x).relu()
        return self.fc(x)
