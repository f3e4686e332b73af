"""Masks to and from ``torch.nn.utils.prune``, and onto a user's own module.

``torch.nn.utils.prune`` keeps a pruned parameter ``weight`` as a parameter
``weight_orig`` (the values, pruned ones included), a buffer ``weight_mask`` (1 =
kept) and a forward pre-hook that recomputes ``weight = weight_orig * weight_mask``.
ticketlab keeps a :class:`~ticketlab.masks.Mask` beside a plain state dict whose
pruned weights are zero. The two hold the same network:

- :func:`from_torch_prune` reads a module pruned with ``torch.nn.utils.prune`` (or
  its state dict) into a Mask and plain weights;
- :func:`to_torch_prune` prunes a module with ``torch.nn.utils.prune`` by a Mask
  (``custom_from_mask``), optionally loading ticketlab's weights first;
- :func:`torch_prune_state` writes a Mask and weights as the ``*_orig``/``*_mask``
  state dict such a module loads;
- :func:`apply_mask` zeroes a saved mask's pruned weights in a user's own module,
  matching parameters by name and refusing a mask that does not fit.

Kept values are copied, never recomputed, so they pass through bit for bit.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from ..errors import UsageError
from . import Mask

_ORIG, _MASK = "_orig", "_mask"


def _shape(t) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _pruned_pairs(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Parameter name -> (its ``_orig`` key, its ``_mask`` key) for each pruned one."""
    pairs = {}
    for key in state:
        if key.endswith(_ORIG) and key[: -len(_ORIG)] + _MASK in state:
            name = key[: -len(_ORIG)]
            pairs[name] = (key, name + _MASK)
    return pairs


def from_torch_prune(
    source: nn.Module | Mapping[str, torch.Tensor],
) -> tuple[Mask, dict[str, torch.Tensor]]:
    """The Mask and the plain weights of a network pruned with ``torch.nn.utils.prune``.

    ``source`` is the pruned module or its ``state_dict()``. Each ``<name>_orig`` with
    a ``<name>_mask`` beside it becomes ``<name>`` in the weights, its pruned entries
    zero (+0.0) and its kept ones the ``_orig`` values exactly, and ``mask[<name>]``
    is ``_mask != 0``. Everything else (biases, buffers, unpruned weights) is copied as
    it is. The weights load into the same module class unpruned (``load_state_dict``),
    e.g. one built afresh, and the Mask keeps them pruned in ticketlab's training.
    """
    state = source.state_dict() if isinstance(source, nn.Module) else dict(source)
    pairs = _pruned_pairs(state)
    if not pairs:
        raise UsageError(
            "nothing pruned with torch.nn.utils.prune here (no '<name>_orig' with a "
            "'<name>_mask' beside it)"
        )
    used = {k for pair in pairs.values() for k in pair}
    weights, masks = {}, {}
    for key, value in state.items():
        if key in used:
            continue
        weights[key] = value.detach().clone()
    for name, (orig_key, mask_key) in pairs.items():
        orig, keep = state[orig_key].detach(), state[mask_key].detach() != 0
        if keep.shape != orig.shape:
            raise UsageError(
                f"{mask_key} has shape {_shape(keep)} but {orig_key} has {_shape(orig)}"
            )
        masks[name] = keep
        weights[name] = torch.where(keep, orig, torch.zeros((), dtype=orig.dtype))
    # the module's own order: each pruned weight where its `_orig` was
    order = [k[: -len(_ORIG)] if k in used and k.endswith(_ORIG) else k for k in state]
    weights = {k: weights[k] for k in order if k in weights}
    return Mask(masks), weights


def to_torch_prune(
    module: nn.Module, mask: Mask, weights: Mapping[str, torch.Tensor] | None = None
) -> nn.Module:
    """Prune ``module`` in place with ``torch.nn.utils.prune`` by ``mask``.

    With ``weights`` (a ticketlab state dict, e.g. :func:`ticketlab.runs.load_state` of
    a run's ``weights_end``) those are loaded first. Each masked parameter becomes
    ``<name>_orig`` and ``<name>_mask`` with the pre-hook of ``custom_from_mask``, so the
    module computes what ticketlab's masked model computes. A parameter pruned with
    ``torch.nn.utils.prune`` before keeps its old mask too (the two combine). Returns
    ``module``.
    """
    if weights is not None:
        module.load_state_dict(dict(weights))
    params = check_fits(module, mask)
    modules = dict(module.named_modules())
    for name, param in params.items():
        owner, _, attr = name.rpartition(".")
        keep = mask[name].to(device=param.device, dtype=param.dtype)
        torch_prune.custom_from_mask(modules[owner], attr, keep)
    return module


def torch_prune_state(
    mask: Mask,
    weights: Mapping[str, torch.Tensor],
    pruned: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """``weights`` as the state dict of a module pruned with ``torch.nn.utils.prune``:
    each masked ``<name>`` as ``<name>_orig`` (the weights, or ``pruned[name]`` where
    given: the values the pruned places had) and ``<name>_mask`` (1.0 = kept), the rest
    as it is. A module pruned by the same mask (:func:`to_torch_prune`, or
    ``torch.nn.utils.prune.identity`` on each masked parameter) loads it."""
    out = {}
    for key, value in weights.items():
        if key in mask:
            if tuple(mask[key].shape) != tuple(value.shape):
                raise UsageError(
                    f"mask '{key}' has shape {_shape(mask[key])} but the weight has {_shape(value)}"
                )
            orig = pruned[key] if pruned is not None and key in pruned else value
            out[key + _ORIG] = orig.detach().clone()
            out[key + _MASK] = mask[key].to(dtype=value.dtype, device=value.device)
        else:
            out[key] = value.detach().clone()
    missing = [n for n in mask.names() if n not in weights]
    if missing:
        raise UsageError(f"mask names weights that are not given: {', '.join(missing)}")
    return out


def check_fits(
    module: nn.Module, mask: Mask, rename: Mapping[str, str] | None = None
) -> dict[str, nn.Parameter]:
    """The parameters of ``module`` that ``mask`` prunes, by the mask's names (with
    ``rename`` mapping a mask name to the module's); a one-line
    :class:`~ticketlab.errors.UsageError` naming every name or shape that does not fit."""
    rename = dict(rename or {})
    unknown = [k for k in rename if k not in mask]
    params = dict(module.named_parameters())
    problems, found = [], {}
    for name in mask.names():
        target = rename.get(name, name)
        param = params.get(target)
        if param is None:
            hint = " (pruned with torch.nn.utils.prune?)" if target + _ORIG in params else ""
            problems.append(f"'{target}' is not a parameter of the module{hint}")
        elif tuple(param.shape) != tuple(mask[name].shape):
            problems.append(
                f"'{target}' is {_shape(param)} but the mask's '{name}' is {_shape(mask[name])}"
            )
        else:
            found[target] = param
    if unknown:
        problems.append(f"rename names what the mask lacks: {', '.join(unknown)}")
    if problems:
        raise UsageError(f"the mask does not fit {type(module).__name__}: " + "; ".join(problems))
    return found


@torch.no_grad()
def apply_mask(
    module: nn.Module,
    mask: Mask | str | os.PathLike,
    rename: Mapping[str, str] | None = None,
) -> Mask:
    """Zero the pruned weights of a user's own ``module`` in place by a saved mask.

    ``mask`` is a :class:`~ticketlab.masks.Mask` or the path of a ``mask.safetensors``
    (a run's, or ``Mask.save``'s). Parameters are matched by name (``rename`` maps a
    mask name to the module's where they differ); a name the module lacks or a shape
    that differs is refused, with every misfit in one line, before anything changes.
    Returns the mask under the module's names, ready for ``ticketlab.train(model, data,
    spec, mask=...)``."""
    if not isinstance(mask, Mask):
        mask = Mask.load(mask)
    params = check_fits(module, mask, rename)
    rename = dict(rename or {})
    renamed = Mask({rename.get(n, n): m for n, m in mask.items()})
    for name, param in params.items():
        keep = renamed[name].to(param.device)
        param.masked_fill_(~keep, 0)
    return renamed


__all__ = ["apply_mask", "check_fits", "from_torch_prune", "to_torch_prune", "torch_prune_state"]
