"""Model registry: name -> a freshly built, deterministically initialised nn.Module.

Every model names its output layer `output_layer_name` (always the last nn.Linear in
`modules()` order), because pruning rules treat that layer differently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ticketlab.errors import UsageError
from ticketlab.models.convnets import CONV_FC, CONV_FILTERS, VGG, VGG_CFGS, ConvNet
from ticketlab.models.inits import INITS, canonical_init, initialize, layer_init_std
from ticketlab.models.mlp import MLP
from ticketlab.models.mobilenet import MobileNetV1
from ticketlab.models.resnet import ImageNetResNet, ResNet

__all__ = [
    "INITS",
    "MODELS",
    "build",
    "canonical_init",
    "check",
    "describe_models",
    "initialize",
    "layer_init_std",
]

Scale = Callable[[int], int]


@dataclass(frozen=True)
class ModelEntry:
    description: str
    needs_image: bool
    # (input_shape, num_classes, scale, activation factory or None)
    make: Callable[..., nn.Module]


def _conv(name: str) -> ModelEntry:
    filters = CONV_FILTERS[name]
    return ModelEntry(
        f"{name}: {len(filters)} conv ({','.join(map(str, filters))}) + FC 256-256, "
        "Frankle & Carbin 2019",
        True,
        lambda s, k, sc, act=None: ConvNet(
            s, k, [sc(f) for f in filters], [sc(f) for f in CONV_FC], act
        ),
    )


def _vgg(name: str) -> ModelEntry:
    cfg = VGG_CFGS[name]
    n_conv = sum(v != "M" for v in cfg)
    return ModelEntry(
        f"{name}: {n_conv} conv3x3-BN-ReLU + global avg pool + FC, CIFAR VGG (OpenLTH)",
        True,
        lambda s, k, sc, act=None: VGG(s, k, [v if v == "M" else sc(v) for v in cfg], act),
    )


def _resnet(depth: int) -> ModelEntry:
    n = (depth - 2) // 6
    return ModelEntry(
        f"resnet{depth}: CIFAR ResNet, 3 stages x {n} basic blocks (16,32,64), He et al. 2016",
        True,
        lambda s, k, sc, act=None: ResNet(s, k, n, [sc(16), sc(32), sc(64)], act),
    )


def _mlp(hidden: list[int], description: str) -> ModelEntry:
    return ModelEntry(
        description, False, lambda s, k, sc, act=None: MLP(s, k, [sc(h) for h in hidden], act)
    )


def _no_activation(name: str, activation) -> None:
    if activation is not None:
        raise UsageError(f"model '{name}' takes no activation factory")


MODELS: dict[str, ModelEntry] = {
    "lenet_300_100": _mlp([300, 100], "lenet_300_100: FC 300-100 ReLU, Frankle & Carbin 2019"),
    **{name: _conv(name) for name in CONV_FILTERS},
    **{name: _vgg(name) for name in VGG_CFGS},
    "resnet20": _resnet(20),
    "resnet56": _resnet(56),
    "resnet50": ModelEntry(
        "resnet50: ImageNet ResNet-50, 7x7 stem + 4 stages of bottleneck blocks (3,4,6,3) "
        "+ global avg pool + FC, He et al. 2016 (OpenLTH's imagenet_resnet_50)",
        True,
        lambda s, k, sc, act=None: (
            _no_activation("resnet50", act)
            or ImageNetResNet(s, k, [3, 4, 6, 3], [sc(64), sc(128), sc(256), sc(512)])
        ),
    ),
    "mobilenet_v1": ModelEntry(
        "mobilenet_v1: conv3x3 stem + 13 depthwise-separable blocks (3x3 depthwise, 1x1 "
        "pointwise, BN-ReLU) + global avg pool + FC, Howard et al. 2017 (CIFAR version)",
        True,
        lambda s, k, sc, act=None: _no_activation("mobilenet_v1", act) or MobileNetV1(s, k, sc),
    ),
}
"""Fixed names. The family `mlp_<w1>_<w2>...` (hidden widths in the name) is parsed by `build`."""

MLP_FAMILY = "mlp_<w1>_<w2>..."
_MLP_NAME = re.compile(r"mlp(?:_[1-9][0-9]*)+")


def _choices() -> str:
    return ", ".join(sorted([*MODELS, MLP_FAMILY]))


def _entry(name: str) -> ModelEntry:
    if name in MODELS:
        return MODELS[name]
    if isinstance(name, str) and _MLP_NAME.fullmatch(name):
        hidden = [int(h) for h in name.split("_")[1:]]
        return _mlp(hidden, f"{name}: FC {'-'.join(map(str, hidden))} ReLU")
    raise UsageError(f"unknown model '{name}'; choose from: {_choices()}")


def check(name: str, input_shape: tuple, num_classes: int, width: float = 1.0) -> tuple:
    """Raise UsageError unless `build` would accept these arguments; return the shape as ints."""
    entry = _entry(name)
    try:
        shape = tuple(int(d) for d in input_shape)
    except (TypeError, ValueError):
        raise UsageError(f"bad input shape {input_shape!r} for model '{name}'") from None
    if not shape or min(shape) < 1:
        raise UsageError(f"bad input shape {shape} for model '{name}'")
    if entry.needs_image and len(shape) != 3:
        raise UsageError(f"model '{name}' needs image input (C,H,W); dataset gives {shape}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UsageError(f"number of classes must be a positive integer, got {num_classes!r}")
    if not (isinstance(width, (int, float)) and math.isfinite(width) and width > 0):
        raise UsageError(f"model width must be a positive number, got {width!r}")
    return shape


def _scale(width: float) -> Scale:
    return lambda c: max(1, round(c * width))


def build(
    name: str,
    input_shape: tuple,
    num_classes: int,
    width: float = 1.0,
    init: str = "kaiming_normal",
    seed: int = 0,
    activation: Callable[[tuple], nn.Module] | None = None,
) -> nn.Module:
    """Build model `name` for inputs of `input_shape` (no batch dim), initialised from `seed`.

    The same arguments give bit-identical weights, and the global RNG is left untouched.
    ``activation`` is None (ReLU) or a factory ``fn(shape_of_layer_output) -> nn.Module``
    (shape without the batch dim) that replaces each hidden ReLU (in a ResNet: the
    stem's, and in each block the one after ``bn1`` and the one after the residual
    addition); the parameter names and initial weights do not depend on it.
    """
    if activation is not None and not callable(activation):
        raise UsageError(f"activation must be None or a factory of modules; got {activation!r}")
    shape = check(name, input_shape, num_classes, width)
    canonical_init(init)  # fail on a bad init before spending time on construction
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # construction's default init is overwritten; seed it anyway
        entry = _entry(name)
        if activation is None:
            model = entry.make(shape, num_classes, _scale(width))
        else:
            model = entry.make(shape, num_classes, _scale(width), activation)
    initialize(model, init, torch.Generator().manual_seed(seed))
    model.model_name = name
    return model


def _counts(entry: ModelEntry, shape: tuple) -> tuple[int, int]:
    with torch.device("meta"):  # shapes only: no memory, no init
        model = entry.make(shape, 10, _scale(1.0))
    params = sum(p.numel() for p in model.parameters())
    weights = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
    )
    return params, weights


def describe_models() -> list[dict]:
    """One row per model: name, description, input used for the counts, params, weights.

    `weights` counts Linear/Conv weights (what pruning acts on); `params` everything.
    """
    rows = []
    for name, entry in MODELS.items():
        shape = (3, 32, 32) if entry.needs_image else (1, 28, 28)
        params, weights = _counts(entry, shape)
        rows.append(
            {
                "name": name,
                "description": entry.description,
                "input": "x".join(map(str, shape)) + ", 10 classes",
                "params": params,
                "weights": weights,
            }
        )
    rows.append(
        {
            "name": MLP_FAMILY,
            "description": "FC with the hidden widths in the name, ReLU (e.g. mlp_500_500)",
            "input": "any (flattened)",
            "params": None,
            "weights": None,
        }
    )
    return rows
