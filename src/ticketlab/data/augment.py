"""Batch augmentation: random crop with padding and horizontal flip, vectorised."""

from __future__ import annotations

import torch

from ticketlab.errors import DataError


def crop_flip(
    x: torch.Tensor,
    top: torch.Tensor,
    left: torch.Tensor,
    flip: torch.Tensor,
    padding: int = 4,
    fill: float | torch.Tensor = 0.0,
) -> torch.Tensor:
    """Pad each image of x (B, C, H, W) by `padding` with `fill` (a scalar or one value per
    channel), take the H x W window at (top[b], left[b]) and mirror it where flip[b] is true."""
    if x.dim() != 4:
        raise DataError(f"crop/flip augmentation needs (B, C, H, W) inputs, got {tuple(x.shape)}")
    b, c, h, w = x.shape
    dev = x.device
    fill = torch.as_tensor(fill, dtype=x.dtype, device=dev).reshape(-1)
    padded = fill.view(1, -1, 1, 1).expand(b, c, h + 2 * padding, w + 2 * padding).clone()
    padded[:, :, padding : padding + h, padding : padding + w] = x
    rows = top.to(dev)[:, None] + torch.arange(h, device=dev)
    cols = left.to(dev)[:, None] + torch.arange(w, device=dev)
    cols = torch.where(flip.to(dev)[:, None], cols.flip(1), cols)
    # One gather through broadcast advanced indices: (B,1,1,1), (1,C,1,1), (B,1,H,1), (B,1,1,W).
    return padded[
        torch.arange(b, device=dev)[:, None, None, None],
        torch.arange(c, device=dev)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]


def augment_crop_flip(
    x: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    fill: float | torch.Tensor = 0.0,
    flip_prob: float = 0.5,
) -> torch.Tensor:
    """Random crop after `padding`-pixel padding and horizontal flip with `flip_prob`, drawn
    per sample from `generator` (a CPU generator, so the result is the same on any device).

    The caller seeds `generator` from (augmentation seed, step), which makes a resumed run see
    the same augmented batches.
    """
    b = x.shape[0]
    top = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    left = torch.randint(0, 2 * padding + 1, (b,), generator=generator)
    flip = torch.rand(b, generator=generator) < flip_prob
    return crop_flip(x, top, left, flip, padding, fill)
