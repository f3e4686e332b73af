"""CIFAR ResNets (He et al. 2016, section 4.2) with projection shortcuts, as in OpenLTH.

``activation`` (a factory ``fn(shape_of_layer_output) -> nn.Module``, e.g. a
k-winners layer) replaces the stem's ReLU and, in each block, the ReLU after
``bn1`` and the one after the residual addition. Without it the ReLUs are the
functional ones and no modules are added, so the state dict is as before.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

Activation = Callable[[tuple], nn.Module] | None


def _relu_or(act: nn.Module | None, x):
    return x.relu() if act is None else act(x)


class Block(nn.Module):
    """Basic block: two 3x3 conv+BN; a 1x1 conv+BN shortcut where the shape changes.

    ``out_hw`` is the block's output height and width (the activations' shape needs it).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        activation: Activation = None,
        out_hw: tuple[int, int] = (1, 1),
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.act1 = None if activation is None else activation((c_out, *out_hw))
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.act2 = None if activation is None else activation((c_out, *out_hw))

    def forward(self, x):
        out = _relu_or(self.act1, self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return _relu_or(self.act2, out + self.shortcut(x))


class ResNet(nn.Module):
    """3x3 conv stem, three stages of `n` blocks (stride 2 into stages 2 and 3), GAP, `fc`."""

    def __init__(
        self,
        input_shape: tuple,
        num_classes: int,
        n: int,
        widths: list[int],
        activation: Activation = None,
    ):
        super().__init__()
        h, w = input_shape[1:]
        self.conv = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.act = None if activation is None else activation((widths[0], h, w))
        blocks = []
        c = widths[0]
        for stage, f in enumerate(widths):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                h, w = (h - 1) // stride + 1, (w - 1) // stride + 1  # 3x3, padding 1
                blocks.append(Block(c, f, stride, activation, (h, w)))
                c = f
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        x = self.blocks(_relu_or(self.act, self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


class Bottleneck(nn.Module):
    """ImageNet bottleneck block: 1x1 reduce, 3x3 (carrying the stride), 1x1 expand (x4),
    each with BN; a 1x1 conv+BN projection shortcut where the shape changes."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        out = self.bn3(self.conv3(out))
        return (out + self.shortcut(x)).relu()


class ImageNetResNet(nn.Module):
    """He et al. 2016's ImageNet ResNet: 7x7 stride-2 stem, 3x3 stride-2 max pool, four
    stages of bottleneck blocks (widths 64-512, stride 2 into stages 2-4), GAP, ``fc``.
    ResNet-50 has 3, 4, 6, 3 blocks (25.6M parameters for 1000 classes)."""

    def __init__(self, input_shape: tuple, num_classes: int, blocks: list[int], widths: list[int]):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], widths[0], 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        layers, c = [], widths[0]
        for stage, (n, w) in enumerate(zip(blocks, widths)):
            for i in range(n):
                layers.append(Bottleneck(c, w, 2 if stage > 0 and i == 0 else 1))
                c = w * Bottleneck.expansion
        self.blocks = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        x = self.maxpool(self.bn(self.conv(x)).relu())
        return self.fc(self.pool(self.blocks(x)).flatten(1))
