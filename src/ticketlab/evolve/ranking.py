"""Pareto ranking (NSGA-II's non-dominated fronts and crowding distance), all objectives
maximised, and Gaier & Ha's probabilistic choice of the second objective."""

from __future__ import annotations

import numpy as np


def fronts(objectives: np.ndarray) -> np.ndarray:
    """Front index of each row (0: non-dominated); ``objectives`` is (N, M), maximised."""
    obj = np.asarray(objectives, dtype=float)
    n = len(obj)
    ge = (obj[:, None, :] >= obj[None, :, :]).all(2)
    gt = (obj[:, None, :] > obj[None, :, :]).any(2)
    dominates = ge & gt  # [i, j]: i dominates j
    count = dominates.sum(0)  # how many dominate j
    front = np.full(n, -1)
    current = np.flatnonzero(count == 0)
    level = 0
    while len(current):
        front[current] = level
        for i in current:
            count[dominates[i]] -= 1
        count[current] = -1
        current = np.flatnonzero(count == 0)
        level += 1
    return front


def crowding(objectives: np.ndarray) -> np.ndarray:
    """NSGA-II crowding distance within one front (boundary points: infinite)."""
    obj = np.asarray(objectives, dtype=float)
    n, m = obj.shape
    dist = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(obj[:, k], kind="stable")
        span = obj[order[-1], k] - obj[order[0], k]
        dist[order[0]] = dist[order[-1]] = np.inf
        if span > 0:
            dist[order[1:-1]] += (obj[order[2:], k] - obj[order[:-2], k]) / span
    return dist


def pareto_rank(objectives: np.ndarray) -> np.ndarray:
    """Rank of each row, 0 best: by front, then by crowding distance (larger first)."""
    obj = np.asarray(objectives, dtype=float)
    front = fronts(obj)
    crowd = np.zeros(len(obj))
    for f in np.unique(front):
        members = np.flatnonzero(front == f)
        crowd[members] = crowding(obj[members])
    order = np.lexsort((-crowd, front))
    rank = np.empty(len(obj), dtype=int)
    rank[order] = np.arange(len(obj))
    return rank


def wann_rank(
    mean: np.ndarray,
    best: np.ndarray,
    connections: np.ndarray,
    rng: np.random.Generator,
    p_connections: float = 0.8,
) -> np.ndarray:
    """Gaier & Ha: Pareto over mean performance and, with probability ``p_connections``
    (WANNRelease alg_probMoo), the inverse connection count, else the best performance
    over the shared weights."""
    second = (
        1.0 / np.maximum(np.asarray(connections, dtype=float), 1)
        if rng.random() < p_connections
        else np.asarray(best, dtype=float)
    )
    return pareto_rank(np.c_[mean, second])


def tournament(rank: np.ndarray, pool: np.ndarray, size: int, rng: np.random.Generator) -> int:
    """The best-ranked of ``size`` members of ``pool`` drawn with replacement."""
    picks = pool[rng.integers(len(pool), size=size)]
    return int(picks[np.argmin(rank[picks])])


__all__ = ["crowding", "fronts", "pareto_rank", "tournament", "wann_rank"]
