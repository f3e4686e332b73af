"""k-winners-take-all activations (Ahmad & Scheinkman 2019).

:class:`KWinners` keeps the k largest activations of each sample (for a conv
map: over all C x H x W units) and zeroes the rest. During training the
winners are chosen on boosted values ``x * exp(beta (k/n - d_i))``, with
``d_i`` a running-mean duty cycle of unit i, so rarely winning units are
favoured; the values passed on are the unboosted ones. ``decay_boost`` scales
beta (call it once per epoch). At evaluation the layer keeps ``k_inference``
winners (the paper uses 1.5 k) and no boosting.

For a conv map the duty cycles are per channel by default, as in the paper's
code (its KWinners2d): ``d_c`` is the running mean of the fraction of channel
c's H x W units among the winners, and all units of a channel share one boost
factor; the winners are still the top k over all C x H x W units. One duty
cycle per C x H x W unit stays an option (``duty_cycles="unit"``).

The duty cycles, the count of examples seen and the current boost strength are
buffers, so they are part of the model's state dict and a training checkpoint
resumes them exactly.

:func:`noise_robustness` measures test accuracy under the paper's input noise
(a fraction of each example's pixels set to a bright value) or, as an option,
additive Gaussian noise.
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
    running mean of the duty cycles. ``channels``: the n units are that many
    channels of n / channels units each (a conv map), with one duty cycle and
    one boost factor per channel; None: one per unit.
    """

    def __init__(
        self,
        n: int,
        k: float,
        k_inference: float | None = None,
        beta: float = 1.0,
        beta_decay: float = 0.9,
        duty_period: int = 1000,
        channels: int | None = None,
    ):
        super().__init__()
        self.n = int(n)
        self.k = self._count(k, "k")
        self.k_inference = self.k if k_inference is None else self._count(k_inference, "k")
        if beta < 0 or not 0 <= beta_decay <= 1 or duty_period < 1:
            raise UsageError("kWTA needs beta >= 0, beta-decay in [0, 1] and duty-period >= 1")
        if channels is not None and not (1 <= channels <= self.n and self.n % channels == 0):
            raise UsageError(f"{self.n} units do not split into {channels} channels")
        self.beta_decay, self.duty_period = float(beta_decay), duty_period
        self.channels = None if channels is None else int(channels)
        self.register_buffer("duty", torch.zeros(self.n if channels is None else self.channels))
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
        """The boost factor of each of the n units (a channel's units share one)."""
        # the tensor, not ``beta``: reading the float would sync with the device every step
        factor = torch.exp(self.boost_strength * (self.k / self.n - self.duty))
        if self.channels is None:
            return factor
        return factor.repeat_interleave(self.n // self.channels)

    def _won(self, win: torch.Tensor) -> torch.Tensor:
        """Winners summed over the batch: per unit, or per channel the fraction of its units."""
        flat = win.flatten(1).float()
        if self.channels is None:
            return flat.sum(0)
        return flat.view(flat.shape[0], self.channels, -1).mean(2).sum(0)

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
                self.duty.mul_(1 - batch / period).add_(self._won(win) / period)
                self.seen += batch
        return x * win


DUTY_CYCLES = ("channel", "unit")


def kwinners_factory(
    fraction: float,
    inference_factor: float = 1.5,
    beta: float = 1.0,
    beta_decay: float = 0.9,
    duty_period: int = 1000,
    duty_cycles: str = "channel",
):
    """An activation factory for :func:`ticketlab.models.build`: a :class:`KWinners` per
    layer keeping ``fraction`` of its units (at least 1), and ``inference_factor`` times as
    many (at most all) in eval mode. ``duty_cycles``: ``channel`` (the paper's) counts a
    conv layer's duty cycles and boosts per channel, ``unit`` per C x H x W unit; a dense
    layer's are per unit either way."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 < fraction <= 1
    ):
        raise UsageError(f"k-winners fraction must be in (0, 1]; got {fraction}")
    if not (isinstance(inference_factor, (int, float)) and inference_factor >= 1):
        raise UsageError(f"k-winners inference factor must be >= 1; got {inference_factor}")
    if duty_cycles not in DUTY_CYCLES:
        raise UsageError(
            f"unknown duty cycles '{duty_cycles}'; choose from: {', '.join(DUTY_CYCLES)}"
        )

    def make(shape: tuple) -> KWinners:
        n = math.prod(shape)
        k = max(1, min(n, round(fraction * n)))
        k_inf = max(1, min(n, round(inference_factor * k)))
        channels = shape[0] if duty_cycles == "channel" and len(shape) > 1 else None
        return KWinners(n, k, k_inf, beta, beta_decay, duty_period, channels)

    return make


class BoostDecay:
    """Training-loop callback: decays the boost strength of every KWinners once per epoch."""

    def on_epoch_end(self, epoch: int, model: nn.Module) -> None:
        for m in model.modules():
            if isinstance(m, KWinners):
                m.decay_boost()


NOISE_KINDS = ("pixels", "gaussian")
PAPER_NOISE_LEVELS = tuple(i / 20 for i in range(11))  # 0, 0.05, ..., 0.5
BRIGHT_STDS = 2.0  # the paper's noise value: the inputs' mean + 2 std


def bright_value(x: torch.Tensor, stds: float = BRIGHT_STDS) -> torch.Tensor:
    """Per channel (dim 1) mean + ``stds`` population std of ``x``: the paper's noise
    value (0.1307 + 2 x 0.3081 on raw MNIST, so 2 once normalised by those statistics)."""
    if x.dim() == 1:
        x = x[:, None]
    dims = [d for d in range(x.dim()) if d != 1]
    var, mean = torch.var_mean(x, dim=dims, correction=0)
    return mean + stds * var.sqrt()


def noisy_count(fraction: float, size: int) -> int:
    """How many of ``size`` values pixel noise sets: int(fraction * size), as the paper's
    code counts them (with a guard against float error: 0.29 of 100 is 29)."""
    return int(fraction * size + 1e-9)


def pixel_noise(
    x: torch.Tensor,
    fraction: float,
    value: torch.Tensor | float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``x`` with :func:`noisy_count` of each example's values (all C x H x W of them, as
    the paper's code flattens an image), drawn uniformly without replacement and
    independently per example, set to ``value``: a number, or one per channel (dim 1)."""
    if not 0 <= fraction <= 1:
        raise UsageError(f"a pixel-noise level is a fraction in [0, 1]; got {fraction}")
    flat = x.flatten(1)
    size = flat.shape[1]
    count = noisy_count(fraction, size)
    value = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    if value.dim() == 1 and x.dim() > 1:  # one per channel
        value = value.view(-1, *[1] * (x.dim() - 2))
    fill = value.expand(x.shape[1:]).reshape(1, size)
    if count == 0:
        return x.clone()
    order = torch.rand(flat.shape, generator=generator).argsort(dim=1)[:, :count]
    hit = torch.zeros(flat.shape, dtype=torch.bool).scatter_(1, order, True).to(x.device)
    return torch.where(hit, fill, flat).view_as(x)


@torch.no_grad()
def noise_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    scales=PAPER_NOISE_LEVELS,
    seed: int = 0,
    kind: str = "pixels",
    value: torch.Tensor | float | None = None,
) -> dict[float, float]:
    """Test accuracy at each noise level in ``scales``.

    ``pixels`` (Ahmad & Scheinkman 2019): a level is the fraction of each example's
    pixels set to ``value`` by :func:`pixel_noise`; ``value`` defaults to
    :func:`bright_value` of ``x`` (the experiment passes the training set's, as the
    paper's code does). ``gaussian``: a level is the scale, times the std of ``x``, of
    Gaussian noise added to ``x``.
    """
    if kind not in NOISE_KINDS:
        raise UsageError(f"unknown noise kind '{kind}'; choose from: {', '.join(NOISE_KINDS)}")
    if kind == "pixels" and not all(0 <= float(s) <= 1 for s in scales):
        raise UsageError(f"pixel-noise levels are fractions in [0, 1]; got {tuple(scales)}")
    was = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    if kind == "pixels" and value is None:
        value = bright_value(x)
    out = {}
    if kind == "gaussian":
        std = float(x.std())
    for s in scales:
        if kind == "gaussian":
            noisy = x + s * std * torch.randn(x.shape, generator=gen).to(x)
        else:
            noisy = pixel_noise(x, float(s), value, gen)
        out[float(s)] = float((model(noisy).argmax(1) == y).float().mean())
    model.train(was)
    return out


__all__ = [
    "BRIGHT_STDS",
    "DUTY_CYCLES",
    "NOISE_KINDS",
    "PAPER_NOISE_LEVELS",
    "BoostDecay",
    "KWinners",
    "bright_value",
    "kwinners_factory",
    "noise_robustness",
    "noisy_count",
    "pixel_noise",
]
