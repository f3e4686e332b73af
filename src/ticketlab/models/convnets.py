"""Plain convolutional networks: Conv-2/4/6 (Frankle & Carbin 2019) and CIFAR VGG with BN."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ticketlab.models.mlp import hidden_forward

Activation = Callable[[tuple], nn.Module] | None

# Frankle & Carbin 2019, fig. 2: pairs of 3x3 convs, each pair followed by a 2x2 max-pool.
CONV_FILTERS = {
    "conv2": [64, 64],
    "conv4": [64, 64, 128, 128],
    "conv6": [64, 64, 128, 128, 256, 256],
}
CONV_FC = [256, 256]

VGG_CFGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"],
}  # fmt: skip


def _maybe_pool(layers: list, h: int, w: int) -> tuple[int, int]:
    # A pool on a 1-pixel side would give an empty map; skipping it lets small inputs
    # (28x28 reaches 1x1 after four pools) run through deep stacks.
    if min(h, w) < 2:
        return h, w
    layers.append(nn.MaxPool2d(2))
    return h // 2, w // 2


class ConvNet(nn.Module):
    """Conv-2/4/6: [3x3 conv + ReLU] x 2, max-pool, repeated; FC+ReLU layers; output `fc`."""

    def __init__(
        self,
        input_shape: tuple,
        num_classes: int,
        filters: list[int],
        fc: list[int],
        activation: Activation = None,
    ):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for i, f in enumerate(filters):
            act = nn.ReLU() if activation is None else activation((f, h, w))
            layers += [nn.Conv2d(c, f, 3, padding=1), act]
            c = f
            if i % 2 == 1:
                h, w = _maybe_pool(layers, h, w)
        self.features = nn.Sequential(*layers)
        sizes = [c * h * w, *fc]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.acts = None if activation is None else nn.ModuleList(activation((b,)) for b in fc)
        self.fc = nn.Linear(sizes[-1], num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        return self.fc(hidden_forward(self.features(x).flatten(1), self.hidden, self.acts))


class VGG(nn.Module):
    """CIFAR VGG: conv3x3-BN-ReLU stacks with max-pools, global average pool, output `fc`."""

    def __init__(
        self, input_shape: tuple, num_classes: int, cfg: list, activation: Activation = None
    ):
        super().__init__()
        c, h, w = input_shape
        layers: list[nn.Module] = []
        for v in cfg:
            if v == "M":
                h, w = _maybe_pool(layers, h, w)
            else:
                act = nn.ReLU() if activation is None else activation((v, h, w))
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), act]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))
