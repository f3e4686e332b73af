"""MobileNetV1 (Howard et al. 2017) for small images, as the CIFAR version that the
Discovering Neural Wirings code trains (after kuangliu/pytorch-cifar).

A 3x3 conv stem (stride 1: the inputs are small), then 13 depthwise-separable blocks:
a 3x3 depthwise conv (``groups`` = channels) + BN + ReLU and a 1x1 pointwise conv + BN
+ ReLU, the depthwise conv carrying the block's stride; global average pool and ``fc``.
The width multiplier scales every channel count. A 28x28 input goes 28-14-7-4-2 and a
32x32 one 32-16-8-4-2 through the four stride-2 blocks.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

# (output channels, stride) of each depthwise-separable block
MOBILENET_V1_BLOCKS = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]  # fmt: skip
STEM = 32


class SeparableBlock(nn.Module):
    """Depthwise 3x3 conv (stride ``stride``) + BN + ReLU, pointwise 1x1 conv + BN + ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.depthwise = nn.Conv2d(c_in, c_in, 3, stride, padding=1, groups=c_in, bias=False)
        self.bn1 = nn.BatchNorm2d(c_in)
        self.pointwise = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)

    def forward(self, x):
        x = self.bn1(self.depthwise(x)).relu()
        return self.bn2(self.pointwise(x)).relu()


class MobileNetV1(nn.Module):
    """Stem conv3x3-BN-ReLU, depthwise-separable blocks, global average pool, output ``fc``."""

    def __init__(self, input_shape: tuple, num_classes: int, scale: Callable[[int], int]):
        super().__init__()
        c = scale(STEM)
        self.conv = nn.Conv2d(input_shape[0], c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)
        blocks = []
        for f, stride in MOBILENET_V1_BLOCKS:
            blocks.append(SeparableBlock(c, scale(f), stride))
            c = scale(f)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        x = self.blocks(self.bn(self.conv(x)).relu())
        return self.fc(self.pool(x).flatten(1))


def is_pointwise(module: nn.Module) -> bool:
    """A 1x1 convolution over all input channels (groups 1): what DNW rewires in MobileNetV1."""
    return (
        isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and module.groups == 1
    )
