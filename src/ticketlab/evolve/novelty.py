"""Novelty (Lehman & Stanley 2011): the mean distance of a behaviour to its k nearest
neighbours among the population and an archive of past behaviours.

A behaviour is a ``(W, D)`` array, one descriptor per shared weight value (a maze end
point, an output pattern); the distance between two is the mean over the weight values of
the Euclidean distances, so it is in the descriptor's own units (maze units for the maze).
"""

from __future__ import annotations

import numpy as np
import torch


def distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) behaviour distances; ``a`` and ``b`` are (N, W, D)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)))
    ta = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).transpose(0, 1)
    tb = torch.from_numpy(np.ascontiguousarray(b, dtype=np.float64)).transpose(0, 1)
    d = torch.cdist(ta, tb, compute_mode="donot_use_mm_for_euclid_dist")  # (W, N, M)
    return d.mean(0).numpy()


def novelty(population: np.ndarray, archive: np.ndarray, k: int) -> np.ndarray:
    """Mean distance of each member to its ``k`` nearest others (population and archive)."""
    d = distances(population, np.concatenate([population, archive]) if len(archive) else population)
    np.fill_diagonal(d[:, : len(population)], np.inf)  # not its own neighbour
    k = max(1, min(k, d.shape[1] - 1))
    near = np.sort(d, axis=1)[:, :k]
    return near.mean(1)


class Archive:
    """Behaviours kept for novelty: a member enters when its novelty exceeds ``threshold``.

    The threshold adapts as in Lehman & Stanley: lowered 5% after a generation that adds
    nothing, raised 20% after one that adds more than ``max_added``. Beyond ``max_size``
    the entry closest to another entry is forgotten, repeatedly ("limit memory, forget
    similar behaviours")."""

    def __init__(self, threshold: float, max_size: int, max_added: int = 4, entries=None):
        self.threshold = float(threshold)
        self.max_size = int(max_size)
        self.max_added = int(max_added)
        self.entries = (
            np.zeros((0, 0, 0)) if entries is None or not len(entries) else np.asarray(entries)
        ).astype(float)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, behaviours: np.ndarray, scores: np.ndarray) -> int:
        new = behaviours[scores > self.threshold]
        if len(new):
            self.entries = np.concatenate([self.entries, new]) if len(self.entries) else new
        if len(new) == 0:
            self.threshold *= 0.95
        elif len(new) > self.max_added:
            self.threshold *= 1.2
        self.forget()
        return len(new)

    def forget(self) -> None:
        excess = len(self.entries) - self.max_size
        if excess <= 0:
            return
        d = distances(self.entries, self.entries)
        np.fill_diagonal(d, np.inf)
        keep = np.ones(len(d), dtype=bool)
        for _ in range(excess):  # one at a time: each removal changes the others' nearest
            nearest = np.where(keep, d.min(1), np.inf)
            gone = int(np.argmin(nearest))
            keep[gone] = False
            d[gone, :] = d[:, gone] = np.inf
        self.entries = self.entries[keep]

    def to_json(self) -> dict:
        return {
            "threshold": self.threshold,
            "max_size": self.max_size,
            "max_added": self.max_added,
            "entries": self.entries.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Archive:
        entries = np.asarray(d["entries"], dtype=float) if d["entries"] else None
        return cls(d["threshold"], d["max_size"], d["max_added"], entries)


__all__ = ["Archive", "distances", "novelty"]
