"""BatchNorm-only training (Frankle, Schwab & Morcos 2021).

Every weight stays frozen at its initial value except the BatchNorm scale
(gamma) and shift (beta), and, with ``train_output``, the output layer. Two
variants per replicate (``level`` 0):

- ``bn-only``: the BN affine parameters (and the output layer) train;
- ``random-params``: the same number of parameters, chosen uniformly at random
  over all parameter entries, train; the others stay at init (a gradient mask,
  and the frozen entries are restored after each optimizer step so momentum and
  weight decay cannot move them).

Result columns added: ``trainable`` (parameters trained), ``gamma_threshold``
and ``small_gamma_fraction`` (the fraction of BN scales with |gamma| below the
threshold at the end: features BN learned to switch off).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density, output_weight_name
from ..protocols import snapshot
from ..runs import RESULT_COLUMNS, save_state, write_json
from ..spec import Spec
from ..train import train

VARIANTS = ("bn-only", "random-params")
COLUMNS = ["trainable", "gamma_threshold", "small_gamma_fraction"]


@dataclass(frozen=True)
class BnOnlySpec(Spec):
    """Knobs of ``ticketlab bn-only`` on top of :class:`Spec`."""

    SETUP = (
        "Frankle, Schwab & Morcos 2021 (OpenLTH CIFAR ResNets): ResNet-20, SGD 0.1, "
        "momentum 0.9, batch 128, weight decay 1e-4, Kaiming normal init; its step schedule "
        "(x0.1 at 50% and 75%) is left to --schedule step"
    )

    method: str = "bn-only"
    model: str = "resnet20"
    init: str = "kaiming_normal"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    batch_size: int = 128
    weight_decay: float = 1e-4
    train_output: bool = False
    gamma_threshold: float = 0.01
    random_control: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not math.isfinite(self.gamma_threshold) or self.gamma_threshold < 0:
            raise UsageError(f"gamma threshold must be >= 0; got {self.gamma_threshold}")


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine
    ]


def trainable_names(model: nn.Module, train_output: bool = False) -> list[str]:
    """Names of the BN affine parameters (and the output layer's parameters)."""
    bn = {id(m) for m in bn_layers(model)}
    names = []
    for mod_name, module in model.named_modules():
        if id(module) in bn:
            names += [f"{mod_name}.{p}" if mod_name else p for p in ("weight", "bias")]
    if train_output:
        out = output_weight_name(model)
        if out is not None:
            prefix = out.rsplit(".", 1)[0]
            names += [n for n, _ in model.named_parameters() if n.rsplit(".", 1)[0] == prefix]
    return names


def freeze_except(model: nn.Module, names: list[str]) -> int:
    """Freeze every parameter not in ``names``; return the number of trainable entries."""
    keep = set(names)
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        count += p.numel() if n in keep else 0
    return count


def small_gamma_fraction(model: nn.Module, threshold: float) -> float:
    gammas = [m.weight.detach().abs().flatten() for m in bn_layers(model)]
    if not gammas:
        return float("nan")
    g = torch.cat(gammas)
    return float((g < threshold).float().mean())


def random_param_mask(model: nn.Module, count: int, seed: int) -> dict[str, torch.Tensor]:
    """``count`` parameter entries chosen uniformly over all parameters, by name."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    gen = torch.Generator().manual_seed(seed)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=gen)[:count]] = True
    out, i = {}, 0
    for n, p in params.items():
        out[n] = flat[i : i + p.numel()].view_as(p)
        i += p.numel()
    return out


class FrozenEntries:
    """Train only the entries where ``masks`` is True; the rest stay at their current values.

    Gradients are masked by tensor hooks, and the frozen entries are restored after
    every optimizer step (a training-loop callback), so momentum and weight decay
    cannot move them. Use as a context manager around training; pass it in
    ``callbacks``.
    """

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.model, self.masks = model, masks
        self.hooks: list = []
        self.restore: list = []

    def __enter__(self):
        params = dict(self.model.named_parameters())
        for n, m in self.masks.items():
            p = params[n]
            p.requires_grad_(bool(m.any()))
            if not m.any():
                continue
            mf = m.to(device=p.device, dtype=p.dtype)
            self.hooks.append(p.register_hook(lambda g, mf=mf: g * mf))
            if not m.all():
                self.restore.append((p, m.to(p.device), p.detach().clone()))
        return self

    @torch.no_grad()
    def after_step(self, step, model, optimizer, keeper, x, y) -> None:
        for p, m, p0 in self.restore:
            p.copy_(torch.where(m, p, p0))

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


class BnOnlyExperiment(Experiment):
    """A BN-only run bound to ``<runs-dir>/bn-only-<hash12>``."""

    def __init__(self, spec: BnOnlySpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        if not bn_layers(self.model_fn(0)):
            raise UsageError(
                f"model '{spec.model}' has no BatchNorm with scale and shift; "
                "use a vgg or resnet model"
            )

    def _replicate(self, r: int, levels: int, progress) -> None:
        variants = VARIANTS if self.spec.random_control else VARIANTS[:1]
        for variant in variants:
            vdir = self.dir / f"replicate-{r}" / "level-0" / variant
            if (vdir / "result.json").exists():
                continue
            vdir.mkdir(parents=True, exist_ok=True)
            write_json(vdir / "result.json", self._variant_bn(r, variant, vdir, progress))
            (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
            self.write_results(collect_results(self.dir), RESULT_COLUMNS + COLUMNS)

    def _variant_bn(self, r: int, variant: str, vdir: Path, progress) -> dict:
        spec = self.spec
        model = self.model_fn(self.seed(r, "init"))
        names = trainable_names(model, spec.train_output)
        count = freeze_except(model, names)
        save_state(vdir / "weights_start.safetensors", snapshot(model))
        if variant == "bn-only":
            ctx = contextlib.nullcontext()
        else:
            ctx = FrozenEntries(
                model, random_param_mask(model, count, self.seed(r, "random-params"))
            )
        kwargs = dict(data_seed=self.seed(r, "data"), aug_seed=self.seed(r, "aug"))
        with ctx as frozen:
            metrics = train(
                model,
                self.data,
                spec,
                None,
                workdir=vdir,
                progress=progress,
                label=f"rep {r} {variant} ({count} params)",
                callbacks=[frozen] if frozen is not None else [],
                **kwargs,
            )
        save_state(vdir / "weights_end.safetensors", snapshot(model))
        small = small_gamma_fraction(model, spec.gamma_threshold)
        return {
            "method": spec.method,
            "replicate": r,
            "level": 0,
            "variant": variant,
            "density": Mask.dense(model).density(),
            "density_all": model_density(model),
            **metrics,
            "status": "done",
            "trainable": count,
            "gamma_threshold": spec.gamma_threshold,
            "small_gamma_fraction": small,
        }


__all__ = ["BnOnlyExperiment", "BnOnlySpec", "FrozenEntries", "random_param_mask"]
