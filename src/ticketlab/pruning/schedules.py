"""When masks change: the gradual (polynomial) pruning schedule.

Zhu & Gupta 2017, "To prune, or not to prune" (arXiv 1710.01878), eq. (1):

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3,   t in {t0, t0 + dt, ..., t0 + n dt}

the sparsity rises from ``s_i`` at step ``t0`` to ``s_f`` at step ``t0 + n dt``,
quickly at first and slowly at the end; the mask is updated every ``dt`` steps.
"""

from __future__ import annotations

from ..errors import UsageError


def cubic_sparsity(
    t: int, final: float, initial: float = 0.0, start: int = 0, n: int = 1, frequency: int = 1
) -> float:
    """Zhu & Gupta's s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3, held outside [t0, t0 + nΔt].

    Before ``start`` the sparsity is ``initial``; after ``start + n * frequency``
    it is ``final``.
    """
    if n < 1 or frequency < 1:
        raise UsageError(f"gradual schedule needs n >= 1 and frequency >= 1; got {n}, {frequency}")
    span = n * frequency
    progress = min(max((t - start) / span, 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def pruning_steps(start: int, end: int, frequency: int) -> list[int]:
    """The steps t0, t0 + Δt, ..., t_end at which the mask is updated (``end - start`` = n Δt)."""
    if frequency < 1:
        raise UsageError(f"--frequency must be >= 1 step; got {frequency}")
    if not 0 <= start < end:
        raise UsageError(f"gradual pruning needs 0 <= --start < --end; got {start}, {end}")
    if (end - start) % frequency:
        raise UsageError(
            f"--end - --start ({end - start} steps) must be a multiple of --frequency ({frequency})"
        )
    return list(range(start, end + 1, frequency))


__all__ = ["cubic_sparsity", "pruning_steps"]
