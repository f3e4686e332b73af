"""Discovering Neural Wirings (Wortsman, Farhadi & Rastegari 2019).

The weights and the wiring are trained at once. In every forward pass each wired
layer computes with its top ``density`` of edges by |w| (the "real" edges; the
others are "hallucinated"); the backward pass gives every weight the gradient of
its edge, straight through the top-k, so an edge outside the top k keeps learning
and comes in once its |w| passes the k-th largest (the paper's update rule,
Algorithm 1). This is the ``wiring`` mode of :mod:`ticketlab.masks.forward`; the
training loop is the one every method uses.

``layers`` says which layers are wired: ``all`` (every Linear and Conv weight), or
``pointwise`` (the 1x1 convolutions only, as the paper does for MobileNetV1; the
stem, the depthwise convolutions and the output layer stay dense). Per replicate one
variant ``dnw`` at level 1 is trained from the model's initialisation for the whole
budget; the network stored (``weights_end``, ``mask.safetensors``) is the final
wiring: weights outside it are zeroed.

Results add ``layers``, ``wired_density`` (the target over the wired layers; ``density``
is over all prunable weights), ``wiring_changed`` (the fraction of the final edges that
were not among the initial top k: what the wiring learned), ``params`` (nonzero
parameters), ``macs`` (multiply-adds of one example through the kept edges) and
``macs_dense``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment, collect_results, run_on_module
from ..masks import Mask, model_density, prunable_weights
from ..masks.forward import attach
from ..metrics import forward_flops, layer_macs, sparsity_metrics
from ..models.mobilenet import is_pointwise
from ..protocols import snapshot
from ..runs import RESULT_COLUMNS, load_state, save_state, write_json
from ..spec import Spec, normalize_target
from ..train import train

LAYERS = ("all", "pointwise")
COLUMNS = ["layers", "wired_density", "wiring_changed", "params", "macs", "macs_dense"]


@dataclass(frozen=True)
class DNWSpec(Spec):
    """Knobs of ``ticketlab dnw`` on top of :class:`Spec`: the target (``sparsity`` is
    stored as the density ``1 - S``) over the wired ``layers``."""

    SETUP = (
        "Wortsman et al. 2019 (allenai/dnw CIFAR-10 MobileNetV1 configs): SGD 0.1, momentum "
        "0.9, cosine, weight decay 1e-4, batch 128, Kaiming normal init; top-k per layer"
    )

    method: str = "dnw"
    init: str = "kaiming_normal"
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    batch_size: int = 128
    density: float | None = None
    sparsity: float | None = None
    layers: str = "all"

    def __post_init__(self) -> None:
        normalize_target(self)
        super().__post_init__()
        if self.layers not in LAYERS:
            raise UsageError(f"unknown layers '{self.layers}'; choose from: {', '.join(LAYERS)}")


def wired_names(model: nn.Module, layers: str = "all") -> list[str]:
    """The prunable weights DNW rewires: all, or those of 1x1 convolutions (``pointwise``)."""
    if layers not in LAYERS:
        raise UsageError(f"unknown layers '{layers}'; choose from: {', '.join(LAYERS)}")
    weights = prunable_weights(model)
    if layers == "all":
        return list(weights)
    modules = dict(model.named_modules())
    return [n for n in weights if is_pointwise(modules[n.rsplit(".", 1)[0] if "." in n else ""])]


def wire(model: nn.Module, density: float, layers: str = "all"):
    """Attach DNW to ``model`` (any ``nn.Module``): the Python API. Train it with
    :func:`ticketlab.train`; ``handle.current_mask()`` is the wiring now, and
    ``handle.detach(bake=True)`` leaves the plain model with only those edges."""
    names = wired_names(model, layers)
    if not names:
        raise UsageError(f"the model has no layers to wire with --layers {layers}")
    return attach(model, mode="wiring", density=density, names=names)


def full_mask(model: nn.Module, wiring: Mask) -> Mask:
    """The wiring over the wired layers, dense elsewhere: a mask of every prunable weight."""
    dense = Mask.dense(model)
    return Mask({n: wiring[n] if n in wiring else dense[n] for n in dense.names()})


class DNWExperiment(Experiment):
    """A DNW run bound to ``<runs-dir>/dnw-<hash12>``."""

    def __init__(self, spec: DNWSpec, data=None, model_fn=None, model_id=None):
        if spec.density is None:
            raise UsageError("give the target: --sparsity S or --density D")
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        probe = self.model_fn(0)
        if not wired_names(probe, spec.layers):
            raise UsageError(
                f"model '{spec.model}' has no layers to wire with --layers {spec.layers}"
            )
        self.macs = layer_macs(probe, self.data.input_shape)

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec = self.spec
        vdir = self.dir / f"replicate-{r}" / "level-1" / "dnw"
        if (vdir / "result.json").exists():
            return
        vdir.mkdir(parents=True, exist_ok=True)
        model = self.model_fn(self.seed(r, "init"))
        start = vdir / "weights_start.safetensors"
        if start.exists():  # a resumed run starts from what it stored
            model.load_state_dict(load_state(start))
        else:
            save_state(start, snapshot(model))
        handle = wire(model, spec.density, spec.layers)
        first = handle.current_mask()
        metrics = train(
            model,
            self.data,
            spec,
            None,
            data_seed=self.seed(r, "data"),
            aug_seed=self.seed(r, "aug"),
            workdir=vdir,
            progress=progress,
            label=f"rep {r} dnw {spec.layers} ({100 * spec.density:.1f}%)",
        )
        wiring = handle.current_mask()
        handle.detach(bake=True)
        mask = full_mask(model, wiring)
        mask.save(vdir / "mask.safetensors")
        first.save(vdir / "mask_start.safetensors")
        save_state(vdir / "weights_end.safetensors", snapshot(model), mask)
        kept = sum(int(wiring[n].sum()) for n in wiring.names())
        moved = sum(int((wiring[n] & ~first[n]).sum()) for n in wiring.names())
        row = {
            "method": spec.method,
            "replicate": r,
            "level": 1,
            "variant": "dnw",
            "density": mask.density(),
            "density_all": model_density(model),
            **sparsity_metrics(model, mask, self.data.input_shape),
            **metrics,
            "status": "done",
            "layers": spec.layers,
            "wired_density": spec.density,
            "wiring_changed": moved / kept if kept else 0.0,
            "params": sum(int(torch.count_nonzero(p)) for p in model.parameters()),
            "macs": forward_flops(self.macs, mask.layer_density()),
            "macs_dense": forward_flops(self.macs),
        }
        write_json(vdir / "result.json", row)
        (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS + COLUMNS)


def dnw(model: nn.Module, data, spec: DNWSpec, progress=None) -> list[dict]:
    """A DNW run on a user's own module (later replicates re-initialise it)."""
    return run_on_module(DNWExperiment, model, data, spec, progress)


__all__ = ["LAYERS", "DNWExperiment", "DNWSpec", "dnw", "full_mask", "wire", "wired_names"]
