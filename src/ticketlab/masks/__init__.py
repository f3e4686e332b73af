"""Masks over a network's weights: the object of study.

A :class:`Mask` maps parameter names to boolean tensors (True = kept). By default
the prunable parameters are the weights of Linear and Conv layers; biases,
norms and embeddings are not pruned unless a selection says so
(:mod:`ticketlab.masks.select`: kinds such as ``attention`` and ``embedding``, and
parameter-name globs). Masks are applied *in place*: the weights
are zeroed once and again after every optimizer step (see :class:`MaskKeeper`),
which keeps the state dict plain and the hot loop free of hooks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import torch
from safetensors.torch import save_file
from torch import nn

from ..errors import DataError, UsageError
from .select import kind_of, select, selection_of, set_prunable

PRUNABLE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_weights(model: nn.Module, include=None, exclude=None) -> dict[str, nn.Parameter]:
    """The prunable parameters by name, in module order: those of ``include``/``exclude``
    (kinds and globs, see :func:`ticketlab.masks.select.select`) when given, else the
    selection ``model`` carries (:func:`set_prunable`), else the weights of Linear and
    Conv layers."""
    if include is None and exclude is None:
        include, exclude = selection_of(model)
    if include or exclude:
        return select(model, include or (), exclude or ())
    out = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES) and module.weight is not None:
            out[f"{mod_name}.weight" if mod_name else "weight"] = module.weight
    return out


def output_weight_name(model: nn.Module) -> str | None:
    """The output layer's weight: the last Linear in module order."""
    name = getattr(model, "output_layer_name", None)
    if name is not None:
        return f"{name}.weight"
    last = None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = f"{mod_name}.weight" if mod_name else "weight"
    return last


def layer_kinds(model: nn.Module) -> dict[str, str]:
    """'conv', 'fc' or 'output' for each Linear and Conv weight; and for any other
    prunable parameter of the model's selection, 'attention', 'embedding' or 'other'
    (which prune at the plain per-level fraction)."""
    out_name = output_weight_name(model)
    kinds = {}
    for mod_name, module in model.named_modules():
        if isinstance(module, PRUNABLE_TYPES):
            name = f"{mod_name}.weight" if mod_name else "weight"
            if name == out_name:
                kinds[name] = "output"
            elif isinstance(module, nn.Linear):
                kinds[name] = "fc"
            else:
                kinds[name] = "conv"
    if selection_of(model) != ((), ()):
        modules = dict(model.named_modules())
        for name in prunable_weights(model):
            if name not in kinds:
                mod_name, _, param = name.rpartition(".")
                kinds[name] = kind_of(modules[mod_name], param) or "other"
    return kinds


class Mask:
    """Boolean keep-masks keyed by parameter name."""

    def __init__(self, masks: dict[str, torch.Tensor]):
        self._m = {k: v.detach().to(torch.bool).clone() for k, v in masks.items()}

    # construction -------------------------------------------------------
    @classmethod
    def dense(
        cls, model: nn.Module, names: Iterable[str] | None = None, include=None, exclude=None
    ) -> Mask:
        """All-ones over the prunable parameters: those of ``include``/``exclude`` (module
        kinds ``linear``, ``conv``, ``attention``, ``embedding`` and parameter-name globs)
        when given, else the model's selection (Linear and Conv weights by default); or
        over ``names`` among them."""
        weights = prunable_weights(model, include, exclude)
        if names is not None:
            names = list(names)
            missing = [n for n in names if n not in weights]
            if missing:
                raise UsageError(f"not prunable weights: {', '.join(missing)}")
            weights = {n: weights[n] for n in names}
        return cls({k: torch.ones_like(p, dtype=torch.bool) for k, p in weights.items()})

    @classmethod
    def from_model(cls, model: nn.Module) -> Mask:
        """The mask of nonzero prunable weights."""
        return cls({k: p.detach() != 0 for k, p in prunable_weights(model).items()})

    # mapping ------------------------------------------------------------
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._m[name]

    def __contains__(self, name: str) -> bool:
        return name in self._m

    def __iter__(self):
        return iter(self._m)

    def __len__(self) -> int:
        return len(self._m)

    def items(self):
        return self._m.items()

    def names(self) -> list[str]:
        return list(self._m)

    def copy(self) -> Mask:
        return Mask(self._m)

    def to(self, device) -> Mask:
        """This mask with its tensors on ``device`` (itself where they are there already)."""
        device = torch.device(device)
        if all(m.device == device for m in self._m.values()):
            return self
        return Mask({k: m.to(device) for k, m in self._m.items()})

    @property
    def device(self) -> torch.device:
        """Where the mask's tensors are (the CPU for an empty mask)."""
        first = next(iter(self._m.values()), None)
        return first.device if first is not None else torch.device("cpu")

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, Mask)
            and sorted(self.names()) == sorted(other.names())
            and all(torch.equal(self[k], other[k].to(self[k].device)) for k in self._m)
        )

    # measures -----------------------------------------------------------
    def num_kept(self) -> int:
        return int(sum(int(m.sum()) for m in self._m.values()))

    def num_total(self) -> int:
        return int(sum(m.numel() for m in self._m.values()))

    def density(self) -> float:
        """Kept fraction of the masked weights."""
        total = self.num_total()
        return self.num_kept() / total if total else 1.0

    def sparsity(self) -> float:
        return 1.0 - self.density()

    def layer_density(self) -> dict[str, float]:
        return {k: float(m.float().mean()) for k, m in self._m.items()}

    def jaccard(self, other: Mask) -> float:
        theirs = {k: other[k].to(self[k].device) for k in self._m}
        inter = sum(int((self[k] & theirs[k]).sum()) for k in self._m)
        union = sum(int((self[k] | theirs[k]).sum()) for k in self._m)
        return inter / union if union else 1.0

    # application --------------------------------------------------------
    @torch.no_grad()
    def apply_(self, model: nn.Module) -> nn.Module:
        """Zero the pruned weights of ``model`` in place."""
        params = dict(model.named_parameters())
        for k, m in self._m.items():
            if k not in params:
                raise UsageError(f"mask names '{k}', which the model does not have")
            params[k].mul_(m.to(params[k].device, params[k].dtype))
        return model

    # storage ------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Bit-packed (or, where sparser, as CSR column indices), as
        :func:`ticketlab.runs.pack_state` stores bool tensors; the layer order
        (first ... output) is kept, as safetensors sorts keys."""
        from ..runs import atomic_path, pack_state

        tensors, layout = pack_state({k: m.contiguous() for k, m in self._m.items()}, self)
        if layout:
            metadata = {"ticketlab": json.dumps({"compact": layout}, sort_keys=True)}
        else:  # only tiny layers: one byte per entry, as masks were written before
            tensors = {k: m.to(torch.uint8) for k, m in tensors.items()}
            metadata = {"order": json.dumps(self.names())}
        with atomic_path(path) as tmp:
            save_file(tensors, tmp, metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Mask:
        """A mask :meth:`save` wrote, bit-packed or (as before) one byte per entry."""
        from ..runs import read_state_file

        try:
            tensors, metadata = read_state_file(path)
            order = json.loads(metadata.get("order", "[]"))
        except Exception as exc:  # safetensors raises several types for bad files
            raise DataError(f"mask file {path} is corrupt or not safetensors: {exc}") from None
        names = order if sorted(order) == sorted(tensors) else list(tensors)
        return cls({k: tensors[k].to(torch.bool) for k in names})


def model_density(model: nn.Module) -> float:
    """Nonzero fraction of all parameters (``density_all`` in results)."""
    total = nonzero = 0
    for p in model.parameters():
        total += p.numel()
        nonzero += int(torch.count_nonzero(p))
    return nonzero / total if total else 1.0


class MaskKeeper:
    """Re-zeros pruned weights after each optimizer step.

    Holds the parameters of the layers that are not fully dense and their masks
    as float tensors, so one fused ``_foreach_mul_`` does the work per step.
    Pruned weights therefore stay exactly zero whatever the optimizer and the
    weight decay do to them.
    """

    def __init__(self, model: nn.Module, mask: Mask | None):
        self.model = model
        self.set_mask(mask)

    def set_mask(self, mask: Mask | None) -> None:
        """Keep ``mask`` from now on, zeroing its pruned weights at once.

        Dynamic sparse training changes the mask during training this way.
        """
        self.mask = mask
        self.params: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        if mask is None:
            return
        named = dict(self.model.named_parameters())
        for k, m in mask.items():
            if bool(m.all()):
                continue
            p = named[k]
            self.params.append(p)
            self.masks.append(m.to(device=p.device, dtype=p.dtype))
        self()

    def __bool__(self) -> bool:
        return bool(self.params)

    @torch.no_grad()
    def __call__(self) -> None:
        if self.params:
            torch._foreach_mul_(self.params, self.masks)

    @torch.no_grad()
    def mask_grads(self) -> None:
        """Zero the gradients of pruned weights (so an optimizer keeps no state for them)."""
        pairs = [(p.grad, m) for p, m in zip(self.params, self.masks) if p.grad is not None]
        if pairs:
            torch._foreach_mul_([g for g, _ in pairs], [m for _, m in pairs])


__all__ = [
    "PRUNABLE_TYPES",
    "Mask",
    "MaskKeeper",
    "layer_kinds",
    "model_density",
    "output_weight_name",
    "prunable_weights",
    "set_prunable",
]
