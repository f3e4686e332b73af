"""Export a pruned network for inference: dead units out, dense or CSR per layer.

:func:`compact` turns a masked network (pruned weights exactly zero, eval mode)
into an :class:`ExportedNet` that computes the same outputs with less:

- **Dead units are removed** through the whole network: a unit (a Linear
  unit, a conv channel with its BatchNorm) goes when no surviving weight
  reaches it from the input or none leads from it to the output, found as a
  fixed point (a unit fed only by removed units is removed too). Input
  features that no kept weight reads are dropped inside the model by gathering
  the used ones, so the exported model takes the original's inputs. In a
  ResNet a residual stream's channels are one group per stage (every addition
  keeps the same channels on both sides), so a stream channel goes only when
  it is dead along the whole stage.
- **Removed units that still feed kept ones are folded forward**: a unit with
  no incoming weights outputs a constant (``act(bias)``, or BatchNorm's shift),
  so its contribution is added to the next layer's bias. Behind a padded
  convolution a constant channel does not give a constant map (the border sees
  the padding), so a conv layer can carry an ``offset`` map of its output's
  shape; where the contribution is uniform it goes into the bias. The values
  are read from one pass of the original network (they do not depend on the
  input), so the folding is exact whatever the activations, pools and
  additions in between. A layer left with no kept inputs becomes a constant.
- **Each kept Linear/Conv2d layer is dense or CSR** (``torch.sparse_csr``
  with int32 indices). Fully connected layers run feature-major: activations
  are (features, batch) and a layer is ``addmm(bias, W, x)``, with the CSR
  matrix on the left (``x @ W_csr.T`` is many times slower) and no transposes
  between layers. A CSR convolution is ``W_csr @ unfold(x)``, in chunks of the
  batch. ``format="auto"`` times both forms of each layer on this machine at
  ``batch_size`` and keeps the faster.

On disk an export is a directory: ``manifest.json`` (format, the op list, the
per-layer formats and shapes, input and output shapes, what was measured) and
``weights.safetensors``; :func:`load_exported` rebuilds the module from those
two, nothing unpickled. :func:`export_run` does the whole job for a run in the
run store: build the network from its ``spec.json``, compact it, check its
outputs against the masked original on a test batch (max abs difference at
most :data:`TOLERANCE`, else :class:`ExportCheckError` and nothing written),
measure latency against the dense network, optionally write ONNX (the dense
form of the compacted network, checked with onnxruntime where installed), and
write everything to a temporary directory beside the target, renamed at the
end.

Supported: the registered ``mlp``/``lenet``, ``conv2/4/6``, ``vgg`` (BN) and
``resnet`` models with ReLU, and ``nn.Sequential`` stacks of Linear, Conv2d,
BatchNorm, element-wise activations, pooling, dropout and Flatten. Anything
else is refused with a :class:`UsageError` naming what cannot be compacted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._version import __version__
from .errors import DataError, UsageError

TOLERANCE = 1e-5  # max |exported - original| accepted by the export check
FORMATS = ("auto", "dense", "csr")
FORMAT_NAME = "ticketlab-export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
ONNX_FILE = "model.onnx"
CHECK_EXAMPLES = 512  # test examples the export check runs through both networks
AUTO_GAIN = 1.05  # auto: CSR must time this much faster (near-ties stay dense)
_UNFOLD_FLOATS = 1 << 22  # CSR convolution: unfold at most this many floats at a time

_ACTS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu"}
_ACT_FN = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu}
_SKIP = (nn.Dropout, nn.Identity)  # nothing to do in eval mode


class ExportCheckError(Exception):
    """The exported network's outputs differ from the original's by more than allowed."""


# ---------------------------------------------------------------------------------------
# lowering: the source network as ops over unit groups


@dataclass
class _Layer:
    """A Linear/Conv2d layer of the source: reads units of group ``src`` (``link`` input
    columns per unit: a flatten of C x h x w gives h*w), writes the units of ``dst``."""

    name: str
    module: nn.Module
    src: str
    dst: str
    link: int = 1


class _Lowering:
    """Walks a supported network in data-flow order into template ops, unit groups and
    layers. Template ops are dicts; a weighted op holds its :class:`_Layer`."""

    def __init__(self, output_name: str):
        self.output_name = output_name
        self.groups: dict[str, int] = {}
        self.layers: list[_Layer] = []

    def group(self, name: str, n: int) -> str:
        if name in self.groups and self.groups[name] != n:
            raise UsageError(f"cannot compact: {name} has {n} units, expected {self.groups[name]}")
        self.groups[name] = n
        return name

    def weighted(self, name: str, m: nn.Module, src: str, dst: str | None = None) -> dict:
        """The op of layer ``name`` reading group ``src``; ``dst`` defaults to its own group."""
        if isinstance(m, nn.Linear):
            n_in, n_out, kind = m.in_features, m.out_features, "linear"
        else:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise UsageError(
                    f"cannot compact {name}: only ungrouped convolutions with numeric zero "
                    "padding are supported"
                )
            n_in, n_out, kind = m.in_channels, m.out_channels, "conv2d"
        if src not in self.groups:
            self.group(src, n_in)
        units = self.groups[src]
        if n_in % units or (kind == "conv2d" and n_in != units):
            raise UsageError(f"cannot compact {name}: its {n_in} inputs do not match {units} units")
        if name == self.output_name:
            dst = "output"
        dst = self.group(dst or name, n_out)
        layer = _Layer(name, m, src, dst, n_in // units)
        self.layers.append(layer)
        return {"op": kind, "layer": layer}

    def chain(self, items, cur: str, layout: str, flat: bool) -> tuple[list, str, str, bool]:
        """Template ops of a plain chain of ``(name, module)``. ``layout`` is ``map``
        (N, C, H, W) or ``features`` (N, F); ``flat``: already feature-major."""
        ops: list[dict] = []
        for name, m in items:
            if isinstance(m, _SKIP):
                continue
            if isinstance(m, nn.Linear):
                if layout == "map":
                    raise UsageError(
                        f"cannot compact {name}: a Linear on a feature map (no Flatten)"
                    )
                if not flat:
                    ops.append({"op": "flatten", "gather": cur == "input"})
                    flat = True
                ops.append(self.weighted(name, m, cur))
                cur = ops[-1]["layer"].dst
            elif isinstance(m, nn.Conv2d):
                if layout != "map":
                    raise UsageError(f"cannot compact {name}: a convolution after a Flatten")
                if cur == "input":
                    ops.insert(0, {"op": "gather"})
                ops.append(self.weighted(name, m, cur))
                cur = ops[-1]["layer"].dst
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                ops.append(self.norm(name, m, cur, layout))
            elif type(m) in _ACTS:
                ops.append({"op": "act", "fn": _ACTS[type(m)]})
            elif isinstance(m, nn.Flatten):
                if (m.start_dim, m.end_dim) != (1, -1):
                    raise UsageError(f"cannot compact {name}: only Flatten(1, -1) is supported")
                if layout == "map" or not flat:
                    ops.append({"op": "flatten", "gather": cur == "input"})
                layout, flat = "features", True
            elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)):
                if layout != "map":
                    raise UsageError(f"cannot compact {name}: pooling after a Flatten")
                ops.append(_pool_op(name, m))
            else:
                raise UsageError(
                    f"cannot compact layer {name} ({type(m).__name__}): export supports Linear, "
                    "Conv2d, BatchNorm, ReLU/Tanh/Sigmoid/SiLU, pooling, dropout and Flatten"
                )
        return ops, cur, layout, flat

    def norm(self, name: str, m: nn.Module, cur: str, layout: str) -> dict:
        if m.running_mean is None or m.running_var is None:
            raise UsageError(f"cannot compact {name}: BatchNorm without running statistics")
        if cur not in self.groups:
            self.group(cur, m.num_features)
        if self.groups[cur] != m.num_features:
            raise UsageError(f"cannot compact {name}: it normalises {m.num_features} features")
        return {"op": "batchnorm", "name": name, "module": m, "group": cur, "layout": layout}


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_op(name: str, m: nn.Module) -> dict:
    if isinstance(m, nn.AdaptiveAvgPool2d):
        size = m.output_size if isinstance(m.output_size, tuple) else (m.output_size,) * 2
        if any(s is None for s in size):
            raise UsageError(f"cannot compact {name}: adaptive pooling to a free size")
        return {"op": "adaptive_avgpool2d", "output_size": list(size)}
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            raise UsageError(f"cannot compact {name}: max-pooling that returns indices")
        return {
            "op": "maxpool2d",
            "kernel_size": list(_pair(m.kernel_size)),
            "stride": list(_pair(m.stride or m.kernel_size)),
            "padding": list(_pair(m.padding)),
            "dilation": list(_pair(m.dilation)),
            "ceil_mode": bool(m.ceil_mode),
        }
    return {
        "op": "avgpool2d",
        "kernel_size": list(_pair(m.kernel_size)),
        "stride": list(_pair(m.stride or m.kernel_size)),
        "padding": list(_pair(m.padding)),
        "ceil_mode": bool(m.ceil_mode),
        "count_include_pad": bool(m.count_include_pad),
        "divisor_override": m.divisor_override,
    }


def _flat_children(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    out = []
    for name, m in module.named_children():
        full = f"{prefix}{name}"
        out += _flat_children(m, full + ".") if isinstance(m, nn.Sequential) else [(full, m)]
    return out


def _output_name(model: nn.Module) -> str:
    name = getattr(model, "output_layer_name", None)
    if name is not None:
        return name
    last = None
    for n, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            last = n
    if last is None:
        raise UsageError("cannot compact: the network has no Linear or Conv2d layer")
    return last


def _lower(model: nn.Module, input_shape: tuple) -> _Lowering:
    """Template ops (``low.ops``), unit groups and layers of a supported network."""
    from .models.convnets import VGG, ConvNet
    from .models.mlp import MLP
    from .models.resnet import ResNet

    kind = type(model).__name__
    low = _Lowering(_output_name(model))
    image = len(input_shape) == 3
    if isinstance(model, (MLP, ConvNet)) and model.acts is not None:
        raise UsageError(f"cannot compact this {kind}: custom activations (export needs ReLU)")
    if isinstance(model, MLP):
        low.group("input", math.prod(input_shape))
        ops, cur = [{"op": "flatten", "gather": True}], "input"
        for i, m in enumerate(model.hidden):
            ops += [low.weighted(f"hidden.{i}", m, cur), {"op": "act", "fn": "relu"}]
            cur = ops[-2]["layer"].dst
        ops.append(low.weighted("fc", model.fc, cur))
    elif isinstance(model, ConvNet):
        ops, cur, _, _ = low.chain(
            _flat_children(model.features, "features."), "input", "map", False
        )
        ops.append({"op": "flatten", "gather": False})
        for i, m in enumerate(model.hidden):
            ops += [low.weighted(f"hidden.{i}", m, cur), {"op": "act", "fn": "relu"}]
            cur = ops[-2]["layer"].dst
        ops.append(low.weighted("fc", model.fc, cur))
    elif isinstance(model, VGG):
        ops, cur, _, _ = low.chain(
            _flat_children(model.features, "features."), "input", "map", False
        )
        ops += [_pool_op("pool", model.pool), {"op": "flatten", "gather": False}]
        ops.append(low.weighted("fc", model.fc, cur))
    elif isinstance(model, ResNet):
        ops = _lower_resnet(model, low)
    elif isinstance(model, nn.Sequential):
        layout = "map" if image else "features"
        ops, _, _, _ = low.chain(_flat_children(model), "input", layout, False)
    else:
        raise UsageError(
            f"cannot compact a {kind}: export supports the registered mlp, conv, vgg and "
            "resnet models and nn.Sequential stacks"
        )
    if "output" not in low.groups:
        raise UsageError(f"cannot compact: output layer {low.output_name} is not on the data path")
    low.ops = ops
    return low


def _lower_resnet(model: nn.Module, low: _Lowering) -> list[dict]:
    if model.act is not None or any(b.act1 is not None for b in model.blocks):
        raise UsageError("cannot compact this ResNet: custom activations (export needs ReLU)")
    ops = [{"op": "gather"}, low.weighted("conv", model.conv, "input", "conv")]
    ops += [low.norm("bn", model.bn, "conv", "map"), {"op": "act", "fn": "relu"}]
    stream = "conv"  # one unit group per stage's stream, named by its first producer
    for i, b in enumerate(model.blocks):
        pre = f"blocks.{i}"
        shortcut, out = [], stream
        if len(b.shortcut):
            out = f"{pre}.shortcut.0"
            shortcut = [
                low.weighted(out, b.shortcut[0], stream, out),
                low.norm(f"{pre}.shortcut.1", b.shortcut[1], out, "map"),
            ]
        body = [low.weighted(f"{pre}.conv1", b.conv1, stream)]
        body += [low.norm(f"{pre}.bn1", b.bn1, f"{pre}.conv1", "map"), {"op": "act", "fn": "relu"}]
        body += [low.weighted(f"{pre}.conv2", b.conv2, f"{pre}.conv1", out)]
        body += [low.norm(f"{pre}.bn2", b.bn2, out, "map")]
        ops.append({"op": "residual", "body": body, "shortcut": shortcut, "act": "relu"})
        stream = out
    ops += [_pool_op("pool", model.pool), {"op": "flatten", "gather": False}]
    ops.append(low.weighted("fc", model.fc, stream))
    return ops


# ---------------------------------------------------------------------------------------
# which units stay


def _edges(layer: _Layer) -> torch.Tensor:
    """[dst units, src units] bool: a nonzero weight links the two."""
    w = layer.module.weight.detach()
    nz = w != 0
    if w.dim() == 2:
        return nz.view(w.shape[0], -1, layer.link).any(-1)
    return nz.flatten(2).any(-1)


def kept_units(low: _Lowering) -> dict[str, torch.Tensor]:
    """Bool keep-mask per unit group: reached from the input and reaching the output."""
    edges = {lay.name: _edges(lay) for lay in low.layers}
    fed = {g: torch.zeros(n, dtype=torch.bool) for g, n in low.groups.items()}
    fed["input"][:] = True
    feeds = {g: torch.zeros(n, dtype=torch.bool) for g, n in low.groups.items()}
    feeds["output"][:] = True
    changed = True
    while changed:  # a stream group has producers after some of its consumers: iterate
        changed = False
        for lay in low.layers:
            new = fed[lay.dst] | (edges[lay.name] & fed[lay.src][None, :]).any(1)
            changed |= not torch.equal(new, fed[lay.dst])
            fed[lay.dst] = new
        for lay in reversed(low.layers):
            new = feeds[lay.src] | (edges[lay.name] & feeds[lay.dst][:, None]).any(0)
            changed |= not torch.equal(new, feeds[lay.src])
            feeds[lay.src] = new
    keep = {g: fed[g] & feeds[g] for g in low.groups}
    keep["input"] = feeds["input"]
    keep["output"] = torch.ones(low.groups["output"], dtype=torch.bool)
    return keep


@torch.no_grad()
def _capture(model: nn.Module, low: _Lowering, input_shape: tuple) -> dict[str, torch.Tensor]:
    """What each layer reads on one pass of an all-zero example (its removed constant
    units' values do not depend on the input), and the network's output."""
    mods = {lay.name: lay.module for lay in low.layers}
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in mods.items():

        def hook(module, args, name=name):
            if name in seen:
                raise UsageError(f"cannot compact: layer {name} runs more than once per forward")
            seen[name] = args[0].detach().double().cpu()

        hooks.append(m.register_forward_pre_hook(hook))
    try:
        device = next(model.parameters()).device
        out = model(torch.zeros(1, *input_shape, device=device))
    finally:
        for h in hooks:
            h.remove()
    missing = [n for n in mods if n not in seen]
    if missing:
        raise UsageError(f"cannot compact: layers {', '.join(missing)} are not run by forward")
    seen["__output__"] = out.detach()
    return seen


# ---------------------------------------------------------------------------------------
# the exported network's ops


@contextlib.contextmanager
def _no_beta_warning():
    """torch warns once that sparse CSR is "in beta"; the export tests what it uses."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        yield


def _csr(weight: torch.Tensor) -> torch.Tensor:
    """A dense 2-D matrix as CSR with int32 indices (what the CPU kernels take)."""
    with _no_beta_warning():
        c = weight.to_sparse_csr()
        return torch.sparse_csr_tensor(
            c.crow_indices().to(torch.int32),
            c.col_indices().to(torch.int32),
            c.values(),
            c.shape,
            check_invariants=False,  # built from a valid matrix
        )


class _Op(nn.Module):
    """One step of an :class:`ExportedNet`. ``spec`` is its manifest entry; ``export``
    gives the tensors it stores, under the keys of ``weights.safetensors``.

    ``forward`` reads its tensors through plain attributes that ``_derive`` sets from
    the buffers (``nn.Module``'s lookup of a buffer costs about a microsecond, which a
    single example's forward notices), again after ``.to()`` and in copies."""

    _derived: tuple[str, ...] = ()

    def __init__(self, spec: dict):
        super().__init__()
        self.spec = spec

    def _derive(self) -> None:
        pass

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._derive()
        return self

    def __getstate__(self):
        state = super().__getstate__().copy()
        for k in self._derived:  # a CSR tensor cannot be deep-copied: rebuilt instead
            state.pop(k, None)
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        self._derive()

    def export(self) -> dict[str, torch.Tensor]:
        return {}


class _Weighted(_Op):
    """A Linear or Conv2d layer, dense or CSR. A CSR weight is kept as three buffers
    (so ``state_dict``, ``deepcopy`` and ``.to`` work) and a CSR tensor built on them."""

    _derived = ("_w", "_b", "_bc", "_off")

    def __init__(self, spec: dict, weight: torch.Tensor, bias, offset=None):
        super().__init__(spec)
        self.name = spec["name"]
        self.is_csr = spec["format"] == "csr"
        self.out = weight.shape[0]
        if self.is_csr:
            flat = weight
            if weight.layout != torch.sparse_csr:
                flat = _csr(weight.reshape(self.out, -1))
            self.shape2d = tuple(flat.shape)
            self.register_buffer("crow_indices", flat.crow_indices())
            self.register_buffer("col_indices", flat.col_indices())
            self.register_buffer("values", flat.values())
        else:
            self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("offset", offset)
        self._derive()

    def _derive(self) -> None:
        self._b, self._off = self.bias, self.offset
        self._bc = None if self.bias is None else self.bias[:, None]  # addmm's bias column
        if not self.is_csr:
            self._w = self.weight
            return
        with _no_beta_warning():
            self._w = torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                self.values,
                self.shape2d,
                check_invariants=False,  # checked where it was built or loaded
            )

    def dense_weight(self) -> torch.Tensor:
        if not self.is_csr:
            return self.weight
        shape = [self.out, self.spec["in"], *self.spec.get("kernel_size", [])]
        return self._w.to_dense().reshape(shape)

    def export(self) -> dict[str, torch.Tensor]:
        n = self.name
        if self.is_csr:
            out = {
                f"{n}.weight.crow_indices": self.crow_indices,
                f"{n}.weight.col_indices": self.col_indices,
                f"{n}.weight.values": self.values,
            }
        else:
            out = {f"{n}.weight": self.weight}
        if self.bias is not None:
            out[f"{n}.bias"] = self.bias
        if self.offset is not None:
            out[f"{n}.offset"] = self.offset
        return out


class _Linear(_Weighted):
    """Feature-major: ``x`` is (in, batch), the result (out, batch); a single example
    travels as a vector (in,), which ``addmv`` takes with less overhead."""

    def forward(self, x):
        w, b = self._w, self._b
        if x.dim() == 1:
            return torch.mv(w, x) if b is None else torch.addmv(b, w, x)
        return torch.mm(w, x) if b is None else torch.addmm(self._bc, w, x)


class _Conv2d(_Weighted):
    def __init__(self, spec, weight, bias, offset=None):
        super().__init__(spec, weight, bias, offset)
        self.stride = tuple(spec["stride"])
        self.padding = tuple(spec["padding"])
        self.dilation = tuple(spec["dilation"])
        self.kernel_size = tuple(spec["kernel_size"])

    def forward(self, x):
        if self.is_csr:
            y = self._csr_conv(x)
        else:
            y = F.conv2d(x, self._w, self._b, self.stride, self.padding, self.dilation)
        return y if self._off is None else y + self._off

    def _csr_conv(self, x):
        n, _, h, w = x.shape
        kh, kw = self.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        cols_per = self.shape2d[1] * ho * wo
        chunk = max(1, _UNFOLD_FLOATS // max(cols_per, 1))
        outs = []
        for i in range(0, n, chunk):
            part = x[i : i + chunk]
            cols = F.unfold(part, self.kernel_size, self.dilation, self.padding, self.stride)
            b = part.shape[0]
            cols = cols.transpose(0, 1).reshape(self.shape2d[1], b * ho * wo)
            if self._b is None:
                y = torch.mm(self._w, cols)
            else:
                y = torch.addmm(self._bc, self._w, cols)
            outs.append(y.view(self.out, b, ho, wo).transpose(0, 1))
        return torch.cat(outs) if len(outs) > 1 else outs[0].contiguous()


class _BatchNorm(_Op):
    _derived = ("_args",)
    _ATTRS = ("running_mean", "running_var", "weight", "bias")

    def __init__(self, spec, tensors: dict[str, torch.Tensor]):
        super().__init__(spec)
        n = spec["name"]
        self.name, self.eps, self.features = n, float(spec["eps"]), spec["layout"] == "features"
        for attr in self._ATTRS:
            self.register_buffer(attr, tensors.get(f"{n}.{attr}"))
        self._derive()

    def _derive(self) -> None:
        self._args = tuple(getattr(self, a) for a in self._ATTRS)

    def forward(self, x):
        one = x.dim() == 1  # feature-major, a single example
        if self.features:  # feature-major (F, batch): normalise the transposed view
            x = x[None] if one else x.T
        y = F.batch_norm(x, *self._args, False, 0.0, self.eps)
        if not self.features:
            return y
        return y[0] if one else y.T.contiguous()

    def export(self):
        return {
            f"{self.name}.{a}": getattr(self, a)
            for a in self._ATTRS
            if getattr(self, a) is not None
        }


class _Act(_Op):
    def __init__(self, spec):
        super().__init__(spec)
        self.fn = _ACT_FN[spec["fn"]]
        self.inplace = bool(spec.get("inplace")) and spec["fn"] == "relu"

    def forward(self, x):
        return x.relu_() if self.inplace else self.fn(x)


class _Gather(_Op):
    """Input channels the network reads (dim 1 of an image batch)."""

    _derived = ("_idx",)

    def __init__(self, spec, index):
        super().__init__(spec)
        self.register_buffer("index", index)
        self._derive()

    def _derive(self) -> None:
        self._idx = self.index

    def forward(self, x):
        return x.index_select(1, self._idx)

    def export(self):
        return {"input.index": self.index}


class _Flatten(_Gather):
    """(N, ...) -> feature-major (F, N), gathering the input features read, if any."""

    def __init__(self, spec, index=None):
        super().__init__(spec, index)

    def forward(self, x):
        idx = self._idx
        if x.shape[0] == 1:  # a single example: a vector (see _Linear)
            x = x.reshape(-1)
            return x if idx is None else x.index_select(0, idx)
        if idx is None:
            return x.flatten(1).T.contiguous()
        return x.flatten(1).T.index_select(0, idx)

    def export(self):
        return {} if self.index is None else {"input.index": self.index}


class _Constant(_Op):
    """A layer left without kept inputs: its output, the same for every example."""

    _derived = ("_value",)

    def __init__(self, spec, value):
        super().__init__(spec)
        self.name = spec["name"]
        self.features = spec["layout"] == "features"
        self.register_buffer("value", value)
        self._derive()

    def _derive(self) -> None:
        self._value = self.value

    def forward(self, x):
        n, v = x.shape[0], self._value
        if self.features:  # feature-major: (F, batch), or a vector for a single example
            return v.clone() if n == 1 else v[:, None].expand(-1, n).contiguous()
        return v.expand(n, *v.shape).contiguous()

    def export(self):
        return {f"{self.name}.constant": self.value}


class _Pool(_Op):
    def forward(self, x):
        s = self.spec
        if s["op"] == "maxpool2d":
            return F.max_pool2d(
                x, s["kernel_size"], s["stride"], s["padding"], s["dilation"], s["ceil_mode"]
            )
        if s["op"] == "avgpool2d":
            return F.avg_pool2d(
                x,
                s["kernel_size"],
                s["stride"],
                s["padding"],
                s["ceil_mode"],
                s["count_include_pad"],
                s["divisor_override"],
            )
        return F.adaptive_avg_pool2d(x, s["output_size"])


class _BatchFirst(_Op):
    """Feature-major (F, N) (or a single example's vector) back to (N, F)."""

    def forward(self, x):
        return x.unsqueeze(0) if x.dim() == 1 else x.T.contiguous()


class _Residual(_Op):
    """``act(body(x) + shortcut(x))``; an empty shortcut is the identity."""

    def __init__(self, spec, body: list[_Op], shortcut: list[_Op]):
        super().__init__(spec)
        self.body = nn.ModuleList(body)
        self.shortcut = nn.ModuleList(shortcut)
        self.fn = _ACT_FN[spec["act"]] if spec.get("act") else None

    def forward(self, x):
        y = x
        for op in self.body:
            y = op.forward(y)
        s = x
        for op in self.shortcut:
            s = op.forward(s)
        y = y + s
        return y if self.fn is None else self.fn(y)

    def export(self):
        out = {}
        for op in [*self.body, *self.shortcut]:
            out.update(op.export())
        return out


# ---------------------------------------------------------------------------------------
# building ops from a manifest entry and tensors (used by compact and load_exported)


def _tensor(tensors: dict, key: str, shape=None, dtype=None) -> torch.Tensor:
    if key not in tensors:
        raise DataError(f"exported weights are corrupt: tensor {key} is missing")
    t = tensors[key]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise DataError(f"exported weights are corrupt: {key} has shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise DataError(f"exported weights are corrupt: {key} is {t.dtype}, expected {dtype}")
    return t


def _build_op(spec: dict, tensors: dict) -> _Op:
    kind = spec["op"]
    if kind in ("linear", "conv2d"):
        n, o, i = spec["name"], spec["out"], spec["in"]
        kernel = spec.get("kernel_size", [])
        if spec["format"] == "csr":
            cols = i * math.prod(kernel)
            crow = _tensor(tensors, f"{n}.weight.crow_indices", (o + 1,), torch.int32)
            col = _tensor(tensors, f"{n}.weight.col_indices", None, torch.int32)
            val = _tensor(tensors, f"{n}.weight.values", col.shape, torch.float32)
            try:
                with _no_beta_warning():
                    weight = torch.sparse_csr_tensor(
                        crow, col, val, (o, cols), check_invariants=True
                    )
            except RuntimeError as exc:
                raise DataError(f"exported weights are corrupt: {n}: {exc}") from None
        elif spec["format"] == "dense":
            weight = _tensor(tensors, f"{n}.weight", (o, i, *kernel), torch.float32)
        else:
            raise DataError(f"export manifest is corrupt: unknown format {spec['format']!r}")
        bias = _tensor(tensors, f"{n}.bias", (o,), torch.float32) if spec["bias"] else None
        if kind == "linear":
            return _Linear(spec, weight, bias)
        offset = None
        if spec.get("offset"):
            offset = _tensor(tensors, f"{n}.offset", None, torch.float32)
            if offset.dim() != 3 or offset.shape[0] != o:
                raise DataError(f"exported weights are corrupt: {n}.offset has a wrong shape")
        return _Conv2d(spec, weight, bias, offset)
    if kind == "batchnorm":
        n, c = spec["name"], spec["features"]
        have = {}
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if attr in ("running_mean", "running_var") or spec.get("affine", True):
                have[f"{n}.{attr}"] = _tensor(tensors, f"{n}.{attr}", (c,), torch.float32)
        return _BatchNorm(spec, have)
    if kind == "act":
        if spec.get("fn") not in _ACT_FN:
            raise DataError(f"export manifest is corrupt: unknown activation {spec.get('fn')!r}")
        return _Act(spec)
    if kind == "gather":
        return _Gather(spec, _tensor(tensors, "input.index", None, torch.int64))
    if kind == "flatten":
        index = _tensor(tensors, "input.index", None, torch.int64) if spec["gather"] else None
        return _Flatten(spec, index)
    if kind == "constant":
        return _Constant(spec, _tensor(tensors, f"{spec['name']}.constant", spec["shape"]))
    if kind in ("maxpool2d", "avgpool2d", "adaptive_avgpool2d"):
        return _Pool(spec)
    if kind == "batch_first":
        return _BatchFirst(spec)
    if kind == "residual":
        body = [_build_op(s, tensors) for s in spec["body"]]
        return _Residual(spec, body, [_build_op(s, tensors) for s in spec["shortcut"]])
    raise DataError(f"export manifest is corrupt: unknown op {kind!r}")


class ExportedNet(nn.Module):
    """A compacted network: a list of ops from a manifest, in eval mode.

    ``manifest`` is what ``manifest.json`` holds (``architecture`` is the op list,
    ``layers`` the per-layer formats and shapes). Inputs are the original
    network's: (N, *manifest["input_shape"]).
    """

    def __init__(self, manifest: dict, tensors: dict[str, torch.Tensor]):
        super().__init__()
        self.manifest = manifest
        try:
            self.input_shape = tuple(int(d) for d in manifest["input_shape"])
            ops = [_build_op(s, tensors) for s in manifest["architecture"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"export manifest is corrupt: {type(exc).__name__}: {exc}") from None
        self.ops = nn.ModuleList(ops)
        self._steps = tuple(ops)  # iterated without nn.Module's attribute lookup
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.input_shape:
            raise UsageError(f"expected inputs (N, {self.input_shape}); got {tuple(x.shape)}")
        for op in self._steps:
            x = op.forward(x)
        return x

    @property
    def formats(self) -> dict[str, str]:
        """The format of each kept layer: ``dense`` or ``csr``."""
        return {n: info["format"] for n, info in self.manifest["layers"].items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """What ``weights.safetensors`` holds: every op's tensors, on the CPU."""
        out = {}
        for op in self.ops:
            out.update(op.export())
        return {k: v.detach().cpu().contiguous() for k, v in out.items()}

    def stored_values(self) -> int:
        """Numbers stored for the network (values; CSR indices not counted)."""
        kept = (t for k, t in self.tensors().items() if not k.endswith(("_indices", ".index")))
        return sum(t.numel() for t in kept)

    def as_format(self, fmt: str) -> ExportedNet:
        """A copy with every layer in ``fmt`` (``dense`` or ``csr``); same outputs."""
        if fmt not in ("dense", "csr"):
            raise UsageError(f"format must be dense or csr; got {fmt!r}")
        manifest = json.loads(json.dumps(self.manifest))
        tensors = {}
        weights = {}
        for op in _walk(self.ops):
            if isinstance(op, _Weighted):
                weights[op.name] = op.dense_weight().detach().cpu()
        for k, v in self.tensors().items():
            if ".weight." not in k:
                tensors[k] = v
        for spec in _walk_specs(manifest["architecture"]):
            if spec["op"] in ("linear", "conv2d"):
                spec["format"] = fmt
                manifest["layers"][spec["name"]]["format"] = fmt
                w = weights[spec["name"]]
                if fmt == "dense":
                    tensors[f"{spec['name']}.weight"] = w
                else:
                    c = _csr(w.reshape(w.shape[0], -1))
                    tensors[f"{spec['name']}.weight.crow_indices"] = c.crow_indices()
                    tensors[f"{spec['name']}.weight.col_indices"] = c.col_indices()
                    tensors[f"{spec['name']}.weight.values"] = c.values()
        return ExportedNet(manifest, tensors)


def _walk(ops):
    for op in ops:
        yield op
        if isinstance(op, _Residual):
            yield from _walk([*op.body, *op.shortcut])


def _walk_specs(specs):
    for s in specs:
        yield s
        if s["op"] == "residual":
            yield from _walk_specs([*s["body"], *s["shortcut"]])


# ---------------------------------------------------------------------------------------
# compaction


def _time_pair(fa, fb, budget: float = 0.2, min_reps: int = 3, max_reps: int = 200):
    """Median seconds of ``fa`` and ``fb``, timed alternately after a warm-up each."""
    with torch.inference_mode():
        fa(), fb()
        ta, tb = [], []
        end = time.perf_counter() + budget
        for r in range(max_reps):
            for f, ts in ((fa, ta), (fb, tb)) if r % 2 == 0 else ((fb, tb), (fa, ta)):
                t0 = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t0)
            if r + 1 >= min_reps and time.perf_counter() > end:
                break
    return statistics.median(ta), statistics.median(tb)


class _Compiler:
    """Turns template ops into manifest ops and tensors for the kept units."""

    def __init__(self, low, keep, seen, fmt: str, batch_size: int):
        self.low, self.keep, self.seen = low, keep, seen
        self.idx = {g: torch.nonzero(m).flatten() for g, m in keep.items()}
        self.fmt, self.batch_size = fmt, batch_size
        self.tensors: dict[str, torch.Tensor] = {}
        self.layers: dict[str, dict] = {}

    def cols(self, layer: _Layer) -> torch.Tensor:
        idx = self.idx[layer.src]
        if layer.link == 1:
            return idx
        return (idx[:, None] * layer.link + torch.arange(layer.link)).flatten()

    def ops(self, tops: list[dict]) -> list[dict]:
        """Manifest ops of a list; a constant layer drops what came before it (its
        value does not depend on it). ``dead`` marks a step whose units are all gone."""
        out: list[dict] = []
        for t in tops:
            kind = t["op"]
            if kind == "gather":
                if not bool(self.keep["input"].all()):
                    out.append({"op": "gather", "_t": {"input.index": self.idx["input"]}})
            elif kind == "flatten":
                spec = {"op": "flatten", "gather": False}
                if t["gather"] and not bool(self.keep["input"].all()):
                    spec = {
                        "op": "flatten",
                        "gather": True,
                        "_t": {"input.index": self.idx["input"]},
                    }
                out.append(spec)
            elif kind in ("linear", "conv2d"):
                # a CSR layer reading the gathered input reads the original features instead
                gathered = kind == "linear" and bool(out) and out[-1].get("gather") is True
                spec = self.layer(kind, t["layer"], gathered)
                if spec["op"] == "constant":
                    out = []
                elif gathered and spec["format"] == "csr":
                    out[-1] = {"op": "flatten", "gather": False}
                out.append(spec)
            elif kind == "batchnorm":
                out.append(self.norm(t))
            elif kind == "act":
                prev = out[-1]["op"] if out else None
                inplace = prev in ("linear", "conv2d", "batchnorm")
                out.append({"op": "act", "fn": t["fn"], "inplace": inplace})
            elif kind == "residual":
                body, shortcut = self.ops(t["body"]), self.ops(t["shortcut"])
                dead = any(s["op"] == "dead" for s in _walk_specs([*body, *shortcut]))
                res = {"op": "residual", "body": body, "shortcut": shortcut, "act": t["act"]}
                out.append({"op": "dead"} if dead else res)
            else:  # pooling
                out.append(dict(t))
        return out

    @torch.no_grad()
    def layer(self, kind: str, lay: _Layer, gathered: bool = False) -> dict:
        """The manifest op of one layer. ``gathered``: it reads the gathered input
        features; as CSR it reads all of them instead (unread columns cost nothing)."""
        m = lay.module
        rows, cols = self.idx[lay.dst], self.cols(lay)
        w = m.weight.detach().cpu()
        # what the removed inputs contribute: their values on the pass, kept ones zeroed
        x = self.seen[lay.name].clone()
        x[:, cols] = 0
        if kind == "linear":
            contrib = F.linear(x, w.double())[0]
        else:
            contrib = F.conv2d(x, w.double(), None, m.stride, m.padding, m.dilation)[0]
        contrib = contrib[rows]
        bias = m.bias.detach().cpu().double()[rows] if m.bias is not None else None
        layout = "features" if kind == "linear" else "map"
        if len(cols) == 0:  # no kept inputs: the layer's output is a constant
            value = contrib if bias is None else contrib + bias.view(-1, *[1] * (contrib.dim() - 1))
            self.layers[lay.name] = {
                "kind": kind,
                "format": "constant",
                "original_shape": list(w.shape),
                "shape": [len(rows), 0],
                "nonzero": 0,
            }
            return {
                "op": "constant",
                "name": lay.name,
                "layout": layout,
                "shape": list(value.shape),
                "_t": {f"{lay.name}.constant": value.float()},
            }
        if len(rows) == 0:
            return {"op": "dead"}
        offset = None
        if kind == "conv2d" and contrib.numel():
            uniform = bool((contrib == contrib[:, :1, :1]).all())
            if uniform:
                contrib = contrib[:, 0, 0]
            else:
                offset = contrib
        if kind == "linear" or offset is None:
            if bool(contrib.any()):
                bias = contrib if bias is None else bias + contrib
        weight = w.index_select(0, rows).index_select(1, cols).contiguous()
        spec = {"op": kind, "name": lay.name, "in": len(cols), "out": len(rows)}
        if kind == "conv2d":
            spec.update(
                kernel_size=list(m.kernel_size),
                stride=list(m.stride),
                padding=list(m.padding),
                dilation=list(m.dilation),
                offset=offset is not None,
            )
        spec["bias"] = bias is not None
        bias_t = None if bias is None else bias.float()
        offset_t = None if offset is None else offset.float()
        full = None
        if gathered:  # the weight over all input features, zero where none is read
            full = weight.new_zeros(len(rows), w.shape[1])
            full[:, cols] = weight
        spec["format"], timing = self.choose(kind, spec, weight, bias_t, offset_t, full, cols)
        tensors = {f"{lay.name}.bias": bias_t} if bias_t is not None else {}
        if offset_t is not None:
            tensors[f"{lay.name}.offset"] = offset_t
        if spec["format"] == "csr":
            if full is not None:
                weight, spec["in"] = full, w.shape[1]
            c = _csr(weight.reshape(len(rows), -1))
            tensors[f"{lay.name}.weight.crow_indices"] = c.crow_indices()
            tensors[f"{lay.name}.weight.col_indices"] = c.col_indices()
            tensors[f"{lay.name}.weight.values"] = c.values()
        else:
            tensors[f"{lay.name}.weight"] = weight
        spec["_t"] = tensors
        self.layers[lay.name] = {
            "kind": kind,
            "format": spec["format"],
            "original_shape": list(w.shape),
            "shape": [len(rows), *weight.shape[1:]] if full is None else [len(rows), len(cols)],
            "nonzero": int(torch.count_nonzero(weight)),
            **timing,
        }
        if full is not None and spec["format"] == "csr":
            self.layers[lay.name]["reads_input_columns"] = True
        return spec

    def choose(self, kind, spec, weight, bias, offset, full=None, cols=None) -> tuple[str, dict]:
        """``dense`` or ``csr`` for a layer, and what was timed (microseconds). With
        ``full`` (the weight over all input features) the dense form pays for gathering
        the input features ``cols`` and the CSR form reads them all."""
        if self.fmt != "auto":
            return self.fmt, {}
        cls = _Linear if kind == "linear" else _Conv2d
        dense = cls({**spec, "format": "dense"}, weight, bias, offset)
        sparse = cls({**spec, "format": "csr"}, weight if full is None else full, bias, offset)
        b = self.batch_size
        if full is not None:  # fed by the flatten op, gathering or not
            gather, flat = _Flatten({"op": "flatten"}, cols), _Flatten({"op": "flatten"})
            x = torch.randn(b, full.shape[1])
            td, ts = _time_pair(lambda: dense(gather(x)), lambda: sparse(flat(x)))
        else:
            if kind == "linear":  # feature-major, a vector for a single example
                x = torch.randn(spec["in"]) if b == 1 else torch.randn(spec["in"], b)
            else:
                h, w = self.seen[spec["name"]].shape[2:]
                x = torch.randn(b, spec["in"], h, w)
            td, ts = _time_pair(lambda: dense(x), lambda: sparse(x))
        fmt = "csr" if ts * AUTO_GAIN < td else "dense"
        return fmt, {"dense_us": round(td * 1e6, 2), "csr_us": round(ts * 1e6, 2)}

    def norm(self, t: dict) -> dict:
        m, idx, n = t["module"], self.idx[t["group"]], t["name"]
        if len(idx) == 0:
            return {"op": "dead"}
        tensors = {}
        affine = m.weight is not None
        for attr in ("weight", "bias", "running_mean", "running_var"):
            v = getattr(m, attr)
            if v is not None:
                tensors[f"{n}.{attr}"] = v.detach().cpu().float().index_select(0, idx).contiguous()
        spec = {"op": "batchnorm", "name": n, "features": len(idx), "eps": float(m.eps)}
        spec.update(layout=t["layout"], affine=affine, _t=tensors)
        return spec


def _strip(specs: list[dict], tensors: dict) -> list[dict]:
    """Manifest ops without their tensors (moved into ``tensors``)."""
    out = []
    for s in specs:
        s = dict(s)
        tensors.update(s.pop("_t", {}))
        if s["op"] == "residual":
            s["body"], s["shortcut"] = _strip(s["body"], tensors), _strip(s["shortcut"], tensors)
        out.append(s)
    return out


@torch.no_grad()
def compact(
    model: nn.Module, input_shape: tuple, format: str = "auto", batch_size: int = 256
) -> ExportedNet:
    """The compacted :class:`ExportedNet` of ``model`` (masked: pruned weights zero).

    ``format``: ``auto`` (per layer, the faster of dense and CSR, timed here at
    ``batch_size``), ``dense`` or ``csr``. ``model`` is put in eval mode (BatchNorm
    uses its running statistics, as the exported network does).
    """
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; choose from: {', '.join(FORMATS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer; got {batch_size!r}")
    input_shape = tuple(int(d) for d in input_shape)
    model.eval()
    low = _lower(model, input_shape)
    keep = kept_units(low)
    seen = _capture(model, low, input_shape)
    comp = _Compiler(low, keep, seen, format, batch_size)
    ops = comp.ops(low.ops)
    if any(s["op"] == "dead" for s in _walk_specs(ops)):
        raise UsageError("cannot compact: a step of the network lost all its units")
    if ops and _ends_feature_major(ops):
        ops.append({"op": "batch_first"})
    tensors: dict[str, torch.Tensor] = {}
    arch = _strip(ops, tensors)
    out_shape = list(seen["__output__"].shape[1:])
    manifest = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "ticketlab_version": __version__,
        "input_shape": list(input_shape),
        "output_shape": out_shape,
        "architecture": arch,
        "layers": comp.layers,
        "units": {g: [int(m.sum()), int(m.numel())] for g, m in keep.items()},
        "format_choice": {"requested": format, "batch_size": batch_size},
    }
    return ExportedNet(manifest, tensors)


def _ends_feature_major(ops: list[dict]) -> bool:
    last = ops[-1]
    if last["op"] == "constant":
        return last["layout"] == "features"
    for s in reversed(ops):
        if s["op"] in ("flatten", "linear"):
            return True
        if s["op"] in ("conv2d", "residual", "gather") or s["op"].endswith("pool2d"):
            return False
    return False


# ---------------------------------------------------------------------------------------
# files


def load_exported(path: str | os.PathLike) -> ExportedNet:
    """The network an export directory holds (``manifest.json`` + ``weights.safetensors``),
    in eval mode. Nothing is unpickled."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise UsageError(f"{path} is not a ticketlab export (no {MANIFEST} there)")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path / MANIFEST} is corrupt: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{path / MANIFEST} is not a ticketlab export manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} is export format {manifest.get('format_version')}; "
            f"this ticketlab reads format {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(str(path / WEIGHTS))
    except Exception as exc:  # safetensors raises several types for bad files
        raise DataError(f"weights file {path / WEIGHTS} is corrupt: {exc}") from None
    return ExportedNet(manifest, tensors)


def _check_target(out: Path) -> None:
    """Refuse a target that is a file or a directory holding something else."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / MANIFEST).exists():
        raise UsageError(f"{out} exists and is not a ticketlab export; choose another -o")


@contextlib.contextmanager
def _staged(out: Path):
    """A temporary directory beside ``out``, renamed to ``out`` on success (replacing a
    previous export there); removed on failure, so ``out`` is never half-written."""
    _check_target(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 is for the temporary name only
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write(net: ExportedNet, directory: Path, manifest: dict) -> None:
    from safetensors.torch import save_file

    save_file(net.tensors(), str(directory / WEIGHTS), metadata={"format": FORMAT_NAME})
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def save_exported(net: ExportedNet, out_dir: str | os.PathLike) -> Path:
    """Write ``net`` to ``out_dir`` (atomically: a temporary directory, then a rename)."""
    out = Path(out_dir)
    with _staged(out) as tmp:
        _write(net, tmp, net.manifest)
    return out


# ---------------------------------------------------------------------------------------
# checks and measurements


@torch.inference_mode()
def max_difference(a: nn.Module, b: nn.Module, x: torch.Tensor, batch: int = 256) -> float:
    """Max |a(x) - b(x)| over the examples of ``x``, in batches."""
    worst = 0.0
    for i in range(0, len(x), batch):
        xa = x[i : i + batch]
        d = (a(xa).double() - b(xa).double()).abs().max()
        worst = max(worst, float(d))
    return worst


def latency(reference: nn.Module, model: nn.Module, x: torch.Tensor, budget: float = 1.0):
    """Median seconds of one forward of ``reference`` and of ``model`` on ``x``, timed
    alternately (pairs back to back cancel slow drifts of a shared machine)."""
    return _time_pair(lambda: reference(x), lambda: model(x), budget=budget, min_reps=5)


def _test_batch(spec: dict, input_shape: tuple, data_dir, n: int) -> tuple[torch.Tensor, str]:
    """Up to ``n`` test examples of the run's dataset; random ones where it cannot load."""
    from .data import load

    try:
        data = load(
            spec["dataset"],
            data_dir=data_dir or spec.get("data_dir"),
            val_size=spec.get("val_size"),
            split_seed=spec.get("seed", 0),
            augment=False,
            download_hint=False,
        )
        x = data.x_test[:n]
        return x, f"{len(x)} {spec['dataset']} test examples"
    except DataError:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, *input_shape, generator=g)
        return x, f"{n} random examples ({spec['dataset']} not found)"


def _onnx(net: ExportedNet, directory: Path, x: torch.Tensor) -> dict:
    """Write ``model.onnx`` (the dense form: ONNX has no CSR matmul) and check it with
    onnxruntime where installed."""
    import onnx

    dense = net.as_format("dense")
    path = directory / ONNX_FILE
    # the TorchScript exporter needs only onnx (the newer one also needs onnxscript); its
    # deprecation and tracer notes are about its own future, not about this network
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            dense,
            (x[:2],),
            str(path),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            dynamo=False,
        )
    onnx.checker.check_model(str(path))
    out = {"file": ONNX_FILE, "checked_with": None}
    try:
        import onnxruntime as ort
    except ImportError:
        return out
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        want = net(x).double()
    got = torch.from_numpy(sess.run(None, {"input": x.numpy()})[0]).double()
    diff = float((got - want).abs().max())
    if diff > TOLERANCE:
        raise ExportCheckError(
            f"onnxruntime's outputs differ from the exported network's by {diff:.3g} "
            f"(> {TOLERANCE:g}); nothing written"
        )
    out.update(checked_with=f"onnxruntime {ort.__version__}", max_abs_diff=diff)
    return out


def onnx_available() -> bool:
    try:
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


def export_run(
    run_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    replicate: int = 0,
    level: int | None = None,
    variant: str | None = None,
    format: str = "auto",
    batch_size: int = 256,
    onnx: bool = False,
    data_dir: str | None = None,
) -> dict:
    """Export the network of one run directory (see the module docstring); returns the
    manifest written, whose ``check``, ``counts`` and ``latency`` say what was measured.

    Raises :class:`UsageError` for bad input (nothing written) and
    :class:`ExportCheckError` when the outputs differ by more than :data:`TOLERANCE`.
    """
    from .data.registry import DATASETS
    from .load import load_model
    from .runs import read_json

    out = Path(out_dir)
    if format not in FORMATS:
        raise UsageError(f"unknown format '{format}'; choose from: {', '.join(FORMATS)}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch size must be a positive integer; got {batch_size!r}")
    if onnx and not onnx_available():
        raise UsageError("--onnx needs the onnx package: pip install 'ticketlab[onnx]'")
    _check_target(out)
    run = Path(run_dir)
    original = load_model(run, replicate=replicate, level=level, variant=variant)
    vdir = _chosen(run, replicate, level, variant)
    spec = read_json(run / "spec.json")["spec"]
    input_shape = tuple(DATASETS[spec["dataset"]].input_shape)
    net = compact(original, input_shape, format=format, batch_size=batch_size)
    x, what = _test_batch(spec, input_shape, data_dir, max(CHECK_EXAMPLES, 1))
    diff = max_difference(original, net, x)
    if not diff <= TOLERANCE:
        raise ExportCheckError(
            f"exported outputs differ from the original's by {diff:.3g} on {what} "
            f"(> {TOLERANCE:g}); nothing written"
        )
    xb = x[:batch_size] if len(x) >= batch_size else x[torch.arange(batch_size) % len(x)]
    t_dense, t_export = latency(original, net, xb)
    params = sum(p.numel() for p in original.parameters())
    state = original.state_dict()
    manifest = dict(net.manifest)
    manifest["source"] = {
        "run": str(run),
        "replicate": replicate,
        "level": int(vdir.parent.name.split("-")[1]),
        "variant": vdir.name,
        "model": spec["model"],
        "width": spec.get("width"),
        "dataset": spec["dataset"],
    }
    manifest["check"] = {"max_abs_diff": diff, "tolerance": TOLERANCE, "inputs": what}
    manifest["latency"] = {
        "batch_size": batch_size,
        "threads": torch.get_num_threads(),
        "dense_seconds": t_dense,
        "exported_seconds": t_export,
        "speedup": t_dense / t_export if t_export > 0 else math.inf,
    }
    nonzero = sum(int(torch.count_nonzero(p)) for p in original.parameters())
    manifest["counts"] = {
        "original_parameters": params,
        "original_nonzero": nonzero,
        "original_bytes": sum(t.numel() * t.element_size() for t in state.values()),
        "exported_values": net.stored_values(),
    }
    with _staged(out) as tmp:
        if onnx:
            manifest["onnx"] = _onnx(net, tmp, x[: min(len(x), 64)])
        _write(net, tmp, manifest)
        manifest["counts"]["exported_bytes"] = (tmp / WEIGHTS).stat().st_size
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    net.manifest = manifest
    return manifest


def _chosen(run: Path, replicate: int, level: int | None, variant: str | None) -> Path:
    """The variant directory ``load_model`` read (it has just validated the request)."""
    from .load import PREFERRED

    rdir = run / f"replicate-{replicate}"
    levels = sorted(
        int(p.name.split("-")[1])
        for p in rdir.glob("level-*")
        if p.is_dir() and p.name.split("-")[1].isdigit()
    )
    if level is None:
        have = [k for k in levels if variant is None or (rdir / f"level-{k}" / variant).is_dir()]
        level = have[-1]
    ldir = rdir / f"level-{level}"
    if variant is None:
        variants = sorted(p.name for p in ldir.iterdir() if p.is_dir())
        ranked = [v for v in PREFERRED if v in variants] + [v for v in variants if v != "dense"]
        variant = (ranked or variants)[0]
    return ldir / variant


__all__ = [
    "ExportCheckError",
    "ExportedNet",
    "FORMATS",
    "TOLERANCE",
    "compact",
    "export_run",
    "kept_units",
    "latency",
    "load_exported",
    "max_difference",
    "onnx_available",
    "save_exported",
]
