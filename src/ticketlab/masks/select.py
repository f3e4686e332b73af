"""Which parameters are prunable: module kinds and parameter-name globs.

The default is the weights of Linear and Conv layers. A selection names kinds
(``linear``, ``conv``, ``attention`` for ``nn.MultiheadAttention``'s in-projections,
``embedding``) and globs over parameter names (``encoder.*.weight``,
``*.in_proj_weight``, ``pos_embedding``), and an exclude list of the same. A model
carries its selection (:func:`set_prunable`), so every mask made from it
(``Mask.dense(model)``), every criterion, allocation and protocol, follows it.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..errors import UsageError

LINEAR_TYPES = (nn.Linear,)
CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
# MultiheadAttention's projections of Q, K and V: one packed matrix, or three when the key
# and value sizes differ from the embedding's; its out_proj is a Linear (kind `linear`)
ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
KINDS = ("linear", "conv", "attention", "embedding")
DEFAULT = ("conv", "linear")
ATTRIBUTE = "prunable_selection"  # where a model keeps its selection


def kind_of(module: nn.Module, param: str) -> str | None:
    """The kind of ``module``'s parameter ``param``, or None."""
    if param == "weight" and isinstance(module, LINEAR_TYPES):
        return "linear"
    if param == "weight" and isinstance(module, CONV_TYPES):
        return "conv"
    if param in ATTENTION_WEIGHTS and isinstance(module, nn.MultiheadAttention):
        return "attention"
    if param == "weight" and isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None


def canonical_selection(include, exclude) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Sorted, deduplicated entries; the default (Linear and Conv weights, nothing
    excluded) is ``((), ())`` whichever way it is written, so it hashes as before."""
    inc = tuple(sorted({str(s).strip() for s in include if str(s).strip()}))
    exc = tuple(sorted({str(s).strip() for s in exclude if str(s).strip()}))
    if inc == DEFAULT and not exc:
        inc = ()
    return inc, exc


def _matches(item: str, name: str, kind: str | None) -> bool:
    if item in KINDS:
        return kind == item
    return fnmatch.fnmatchcase(name, item)


def select(model: nn.Module, include=(), exclude=()) -> dict[str, nn.Parameter]:
    """The parameters of ``model`` the selection names, by name, in parameter order.

    ``include`` empty means the default kinds. An entry that is not a kind is a glob over
    parameter names; one that selects nothing is an error (a typo would silently prune
    nothing), as is a selection left empty.
    """
    include = tuple(include) or DEFAULT
    modules = dict(model.named_modules())
    named = list(model.named_parameters())
    kinds = {}
    for name, _ in named:
        mod_name, _, param = name.rpartition(".")
        kinds[name] = kind_of(modules[mod_name], param)
    for item in (*include, *exclude):
        if not any(_matches(item, n, kinds[n]) for n, _ in named) and item not in DEFAULT:
            hint = f"kinds: {', '.join(KINDS)}; or a glob over parameter names"
            raise UsageError(f"prunable '{item}' matches no parameter of the model ({hint})")
    out = {}
    for name, p in named:
        if not any(_matches(i, name, kinds[name]) for i in include):
            continue
        if any(_matches(e, name, kinds[name]) for e in exclude):
            continue
        out[name] = p
    if not out:
        raise UsageError("the prunable selection names no parameter of the model")
    return out


def set_prunable(model: nn.Module, include=(), exclude=()) -> nn.Module:
    """Make ``model``'s prunable parameters those of the selection (checked now); the
    default selection removes any earlier one. Returns ``model``."""
    inc, exc = canonical_selection(include, exclude)
    select(model, inc, exc)
    if inc or exc:
        model.__dict__[ATTRIBUTE] = (inc, exc)
    else:
        model.__dict__.pop(ATTRIBUTE, None)
    return model


def selection_of(model: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The selection ``model`` carries (``((), ())``: the default)."""
    return model.__dict__.get(ATTRIBUTE, ((), ()))
