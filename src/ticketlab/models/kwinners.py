"""k-winners-take-all activations (Ahmad & Scheinkman 2019).

:class:`KWinners` keeps the k largest activations of each sample (for a conv
map: over all C x H x W units) and zeroes the rest. During training the
winners are chosen on boosted values ``x * exp(beta (k/n - d_i))``, with
``d_i`` a running-mean duty cycle of unit i, so rarely winning units are
favoured; the values passed on are the unboosted ones. ``decay_boost`` scales
beta (call it once per epoch). At evaluation the layer keeps ``k_inference``
winners (the paper uses 1.5 k) and no boosting.

The duty cycles, the count of examples seen and the current boost strength are
buffers, so they are part of the model's state dict and a training checkpoint
resumes them exactly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UsageError


class KWinners(nn.Module):
    """Keep the ``k`` largest of ``n`` units per sample.

    ``k`` is a count or, when below 1, a fraction of n. ``k_inference`` (count
    or fraction; default k) is used in eval mode. ``duty_period`` sets the
    running mean of the duty cycles.
    """

    def __init__(
        self,
        n: int,
        k: float,
        k_inference: float | None = None,
        beta: float = 1.0,
        beta_decay: float = 0.9,
        duty_period: int = 1000,
    ):
        super().__init__()
        self.n = int(n)
        self.k = self._count(k, "k")
        self.k_inference = self.k if k_inference is None else self._count(k_inference, "k")
        if beta < 0 or not 0 <= beta_decay <= 1 or duty_period < 1:
            raise UsageError("kWTA needs beta >= 0, beta-decay in [0, 1] and duty-period >= 1")
        self.beta_decay, self.duty_period = float(beta_decay), duty_period
        self.register_buffer("duty", torch.zeros(self.n))
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))
        # float64, as the Python float it replaces: the decays compound exactly as before
        self.register_buffer("boost_strength", torch.tensor(float(beta), dtype=torch.float64))

    @property
    def beta(self) -> float:
        """The current boost strength (decayed once per epoch)."""
        return float(self.boost_strength)

    @beta.setter
    def beta(self, value: float) -> None:
        self.boost_strength.fill_(float(value))

    def _count(self, k: float, name: str) -> int:
        c = int(round(k * self.n)) if 0 < k < 1 else int(k)
        if not 1 <= c <= self.n:
            raise UsageError(f"{name} must be in [1, {self.n}] units (or a fraction); got {k}")
        return c

    def decay_boost(self) -> None:
        """One epoch's decay of the boost strength."""
        self.boost_strength.mul_(self.beta_decay)

    def boost(self) -> torch.Tensor:
        # the tensor, not ``beta``: reading the float would sync with the device every step
        return torch.exp(self.boost_strength * (self.k / self.n - self.duty))

    def winners(self, x: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the winners of each sample of ``x`` (flattened per sample)."""
        flat = x.flatten(1)
        if self.training:
            k, score = self.k, flat * self.boost()
        else:
            k, score = self.k_inference, flat
        idx = score.topk(k, dim=1).indices
        return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, idx, True).view_as(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if math.prod(x.shape[1:]) != self.n:
            raise UsageError(f"KWinners built for {self.n} units got shape {tuple(x.shape)}")
        win = self.winners(x)
        if self.training:
            with torch.no_grad():
                batch = x.shape[0]
                # on the device: reading ``seen`` as an int would sync every forward
                period = (self.seen + batch).clamp(max=self.duty_period).double()
                self.duty.mul_(1 - batch / period).add_(win.flatten(1).float().sum(0) / period)
                self.seen += batch
        return x * win


def kwinners_factory(
    fraction: float,
    inference_factor: float = 1.5,
    beta: float = 1.0,
    beta_decay: float = 0.9,
    duty_period: int = 1000,
):
    """An activation factory for :func:`ticketlab.models.build`: a :class:`KWinners` per
    layer keeping ``fraction`` of its units (at least 1), and ``inference_factor`` times as
    many (at most all) in eval mode."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise UsageError(f"k-winners fraction must be in (0, 1]; got {fraction}")
    if not (isinstance(inference_factor, (int, float)) and inference_factor >= 1):
        raise UsageError(f"k-winners inference factor must be >= 1; got {inference_factor}")

    def make(shape: tuple) -> KWinners:
        n = math.prod(shape)
        k = max(1, min(n, round(fraction * n)))
        k_inf = max(1, min(n, round(inference_factor * k)))
        return KWinners(n, k, k_inf, beta, beta_decay, duty_period)

    return make


class BoostDecay:
    """Training-loop callback: decays the boost strength of every KWinners once per epoch."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, KWinners):
                m.decay_boost()


@torch.no_grad()
def noise_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scales=(0.0, 0.1, 0.2, 0.3, 0.5),
    seed: int = 0,
) -> dict[float, float]:
    """Test accuracy with Gaussian noise of each scale (times the input's std) added to ``x``."""
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    std = float(x.std())
    out = {}
    for s in scales:
        noisy = x + s * std * torch.randn(x.shape, generator=gen).to(x)
        out[float(s)] = float((model(noisy).argmax(1) == y).float().mean())
    model.train(was)
    return out


__all__ = ["BoostDecay", "KWinners", "kwinners_factory", "noise_robustness"]
