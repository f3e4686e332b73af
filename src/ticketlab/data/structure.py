"""Inputs and targets as a tensor, a tuple or a dict of tensors, batched along dim 0.

A model is called as ``model(x)`` for a tensor, ``model(*x)`` for a tuple (or list) and
``model(**x)`` for a dict: the way a user would call it by hand. Every helper here keeps
the structure and works leaf by leaf, so the training loop, evaluation, batch indexing and
device moves treat all three alike.
"""

from __future__ import annotations

import torch

from ticketlab.errors import DataError


def leaves(x) -> list[torch.Tensor]:
    """The tensors of ``x`` in order (dict keys in insertion order)."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return list(x)
    raise DataError(
        f"inputs must be a tensor, a tuple or a dict of tensors; got {type(x).__name__}"
    )


def map_leaves(fn, x):
    """``x`` with ``fn`` applied to every tensor, structure kept."""
    if torch.is_tensor(x):
        return fn(x)
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(fn(v) for v in x)
    raise DataError(
        f"inputs must be a tensor, a tuple or a dict of tensors; got {type(x).__name__}"
    )


def as_structure(x, what: str = "inputs"):
    """Tensors (or array-likes) made tensors, a list made a tuple; every leaf has the same
    length along dim 0."""
    if isinstance(x, dict):
        x = {k: torch.as_tensor(v) for k, v in x.items()}
    elif isinstance(x, (tuple, list)):
        x = tuple(torch.as_tensor(v) for v in x)
    else:
        x = torch.as_tensor(x)
    ls = leaves(x)
    if not ls:
        raise DataError(f"{what} hold no tensors")
    if any(t.dim() == 0 for t in ls):
        raise DataError(f"{what} must be batched along dim 0; found a scalar")
    n = {len(t) for t in ls}
    if len(n) != 1:
        raise DataError(f"{what}: tensors have different lengths along dim 0: {sorted(n)}")
    return x


def length(x) -> int:
    return len(leaves(x)[0])


def take(x, idx: torch.Tensor):
    """The examples ``idx`` (an int64 index tensor) of every leaf."""
    if torch.is_tensor(x):  # indices drawn on the CPU pick from data on any device
        return x.index_select(0, idx.to(x.device))
    return map_leaves(lambda t: t.index_select(0, idx.to(t.device)), x)


def rows(x, start: int, stop: int):
    """Examples ``start:stop`` of every leaf (views)."""
    if torch.is_tensor(x):
        return x[start:stop]
    return map_leaves(lambda t: t[start:stop], x)


def to_device(x, device, non_blocking: bool = False):
    if torch.is_tensor(x):
        return x.to(device, non_blocking=non_blocking)
    return map_leaves(lambda t: t.to(device, non_blocking=non_blocking), x)


def call(model, x):
    """``model(x)``, ``model(*x)`` or ``model(**x)``, by the structure of ``x``."""
    if torch.is_tensor(x):
        return model(x)
    if isinstance(x, dict):
        return model(**x)
    return model(*x)


def shapes(x):
    """Per-example shapes, in the structure of ``x``."""
    if torch.is_tensor(x):
        return tuple(x.shape[1:])
    if isinstance(x, dict):
        return {k: tuple(v.shape[1:]) for k, v in x.items()}
    return tuple(tuple(v.shape[1:]) for v in x)


def is_plain_float(x) -> bool:
    """A single floating tensor: what shape-only probes (FLOP counts, SynFlow) can feed."""
    return torch.is_tensor(x) and x.dtype.is_floating_point


def describe(x) -> str:
    """A short description of the structure and dtypes, for error messages."""
    if torch.is_tensor(x):
        return f"a {x.dtype} tensor"
    if isinstance(x, dict):
        return "a dict of " + ", ".join(f"{k}: {v.dtype}" for k, v in x.items())
    return "a tuple of " + ", ".join(str(v.dtype) for v in x)
