"""CIFAR ResNets (He et al. 2016, section 4.2) with projection shortcuts, as in OpenLTH."""

from __future__ import annotations

from torch import nn


class Block(nn.Module):
    """Basic block: two 3x3 conv+BN; a 1x1 conv+BN shortcut where the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out))
        return (out + self.shortcut(x)).relu()


class ResNet(nn.Module):
    """3x3 conv stem, three stages of `n` blocks (stride 2 into stages 2 and 3), GAP, `fc`."""

    def __init__(self, input_shape: tuple, num_classes: int, n: int, widths: list[int]):
        super().__init__()
        self.conv = nn.Conv2d(input_shape[0], widths[0], 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(widths[0])
        blocks = []
        c = widths[0]
        for stage, f in enumerate(widths):
            for i in range(n):
                blocks.append(Block(c, f, stride=2 if stage > 0 and i == 0 else 1))
                c = f
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        self.output_layer_name = "fc"

    def forward(self, x):
        x = self.blocks(self.bn(self.conv(x)).relu())
        return self.fc(self.pool(x).flatten(1))
