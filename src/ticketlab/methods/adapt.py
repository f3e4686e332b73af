"""Adapting a trained network to new tasks: FiLM against SupSup and fine-tuning.

The network trained by an earlier run (``weights=RUN_DIR``, a ``train`` or
``lottery`` run: replicate r uses that run's replicate r, its level-0 weights)
meets new tasks made from the dataset as SupSup makes them (``permuted``: task
t permutes the input features; ``split``: task t is the class pair (2t, 2t+1)
relabelled 0/1; see :func:`ticketlab.methods.supsup.make_task`). Every task
starts again from the trained weights (the tasks are independent, not a
sequence), and each variant trains with the common training knobs:

- ``film``: only a per-task scale and shift per unit or channel train
  (FiLM, Perez et al. 2018; the same affine-only training as ``bn-only``):
  the BatchNorm scales and shifts where the model has affine BatchNorm,
  otherwise a :class:`FiLM` layer (scale 1 and shift 0 at the start, so the
  network starts as trained) after every hidden Linear or Conv, before its
  activation. With ``train_output`` the output layer trains too. Every other
  parameter stays bit-identical; BatchNorm running statistics are buffers and
  are re-estimated on the task.
- ``supsup``: an edge-popup supermask per task (top ``density`` of |scores|
  per layer) over the trained weights, which stay frozen (SupSup over a
  trained rather than a random network); BatchNorm scales and shifts frozen.
- ``finetune``: every parameter trains.

The output layer is reused, never replaced: a permuted task keeps the classes,
and a split task uses the head's first two outputs (the loss pushes the
others down).

Results: ``level`` is the task (also ``task``), ``variant`` the variant, and
``trained_params`` the number of parameters trained for the task (supsup: one
score per masked weight, kept as a 1-bit mask). ``tasks`` and ``variants`` are
not hashed: asking for more extends the run.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import Dataset
from ..data.tasks import TASK_KINDS, make_task
from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import PRUNABLE_TYPES, Mask, model_density, output_weight_name, prunable_weights
from ..masks.forward import attach, score_init
from ..protocols import snapshot
from ..runs import RESULT_COLUMNS, load_state, read_json, save_state, write_json
from ..spec import Spec, derive_seed
from ..train import train
from .bn_only import bn_layers, freeze_except
from .supermask import freeze, trained_weights_dir

VARIANTS = ("film", "supsup", "finetune")
COLUMNS = ["task", "task_kind", "trained_params"]


@dataclass(frozen=True)
class AdaptSpec(Spec):
    """Knobs of ``ticketlab adapt`` on top of :class:`Spec`."""

    EXTENDS = frozenset({"tasks", "variants"})  # more of them add to the same run
    SETUP = "training as the lottery's (Frankle & Carbin LeNet: Adam 1.2e-3, batch 60)"

    method: str = "adapt"
    weights: str | None = None  # the trained run directory (required)
    task_kind: str = "permuted"
    tasks: int = 1
    variants: tuple[str, ...] = VARIANTS
    train_output: bool = False  # film: train the output layer too
    density: float = 0.5  # supsup: kept fraction per layer

    def __post_init__(self) -> None:
        object.__setattr__(self, "variants", tuple(self.variants))
        super().__post_init__()
        if self.task_kind not in TASK_KINDS:
            raise UsageError(
                f"unknown task kind '{self.task_kind}'; choose from: {', '.join(TASK_KINDS)}"
            )
        if isinstance(self.tasks, bool) or self.tasks < 1:
            raise UsageError(f"tasks must be >= 1; got {self.tasks}")
        if not self.variants:
            raise UsageError(f"no variants; choose from: {', '.join(VARIANTS)}")
        for v in self.variants:
            if v not in VARIANTS:
                raise UsageError(f"unknown variant '{v}'; choose from: {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise UsageError(f"a variant is named twice: {','.join(self.variants)}")
        if not isinstance(self.density, (int, float)) or not 0.0 < float(self.density) < 1.0:
            raise UsageError(f"density must be in (0, 1); got {self.density}")


class FiLM(nn.Module):
    """A scale and a shift per feature (dim 1): ``y = scale * x + shift``; the identity at start."""

    def __init__(self, features: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return x * self.scale.view(shape) + self.shift.view(shape)


def _film_hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
    return module.film(output)


def _prefix(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def add_film(model: nn.Module) -> list[str]:
    """Put a :class:`FiLM` layer after every hidden Linear and Conv of ``model``, in place.

    Each is a child ``film`` of its layer, applied by a forward hook to the layer's
    output (before the activation), so its parameters are ``<layer>.film.scale`` and
    ``<layer>.film.shift`` in the state dict; the output layer gets none. Returns
    their names.
    """
    out = output_weight_name(model)
    names = []
    for mod_name, module in list(model.named_modules()):
        if not isinstance(module, PRUNABLE_TYPES):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if f"{prefix}weight" == out:
            continue
        if hasattr(module, "film"):
            raise UsageError(f"layer '{mod_name}' already has a FiLM layer")
        features = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        w = module.weight
        module.film = FiLM(features).to(device=w.device, dtype=w.dtype)
        module.register_forward_hook(_film_hook)
        names += [f"{prefix}film.scale", f"{prefix}film.shift"]
    return names


def output_parameter_names(model: nn.Module) -> list[str]:
    """The output layer's parameters (weight and bias)."""
    out = output_weight_name(model)
    if out is None:
        return []
    return [n for n, _ in model.named_parameters() if _prefix(n) == _prefix(out)]


def film_parameters(model: nn.Module, train_output: bool = False) -> list[str]:
    """The names of the per-feature scales and shifts to train, adding FiLM layers if needed.

    A model with affine BatchNorm trains its BN scales and shifts; any other gets
    FiLM layers (:func:`add_film`). ``train_output`` adds the output layer.
    """
    bn = {id(m) for m in bn_layers(model)}
    if bn:
        names = [
            f"{mod_name}.{p}" if mod_name else p
            for mod_name, module in model.named_modules()
            if id(module) in bn
            for p in ("weight", "bias")
        ]
    else:
        names = add_film(model)
    if not names:
        raise UsageError("the model has no hidden Linear, Conv or BatchNorm layer to modulate")
    return names + (output_parameter_names(model) if train_output else [])


class AdaptExperiment(Experiment):
    """An adaptation run bound to ``<runs-dir>/adapt-<hash12>``."""

    def __init__(self, spec: AdaptSpec, data=None, model_fn=None, model_id=None):
        if spec.weights is None:
            raise UsageError("adapt needs --weights RUN_DIR (a trained train or lottery run)")
        if not Path(spec.weights).is_dir():
            raise UsageError(f"no run directory {spec.weights}")
        for r in range(spec.replicates):
            trained_weights_dir(spec.weights, r)  # before the data is loaded
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        classes = self.data.num_classes
        if spec.task_kind == "split" and spec.tasks > classes // 2:
            raise UsageError(
                f"{classes} classes make {classes // 2} class-pair tasks; asked for {spec.tasks}"
            )
        probe = self.model_fn(0).state_dict()
        for r in range(spec.replicates):
            state = load_state(self._source(r))
            bad = sorted(set(state) ^ set(probe)) or [
                k for k in probe if tuple(state[k].shape) != tuple(probe[k].shape)
            ]
            if bad:
                raise UsageError(
                    f"weights in {spec.weights} do not fit model '{spec.model}' "
                    f"(first difference: {bad[0]}){_source_summary(spec.weights)}"
                )

    def _source(self, r: int) -> Path:
        return trained_weights_dir(self.spec.weights, r) / "weights_end.safetensors"

    def task(self, t: int) -> Dataset:
        spec = self.spec
        # the seeds of supsup's tasks: task t is the same task in both methods
        return make_task(self.data, spec.task_kind, t, derive_seed(spec.seed, t, "supsup/task"))

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec = self.spec
        source = None
        for t in range(spec.tasks):
            task = None
            for variant in spec.variants:
                vdir = self.dir / f"replicate-{r}" / f"level-{t}" / variant
                if (vdir / "result.json").exists():
                    continue
                source = source if source is not None else load_state(self._source(r))
                task = task if task is not None else self.task(t)
                vdir.mkdir(parents=True, exist_ok=True)
                row = self._variant(r, t, task, variant, source, vdir, progress)
                write_json(vdir / "result.json", row)
                (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
                self.write_results(collect_results(self.dir), RESULT_COLUMNS + COLUMNS)

    def _variant(self, r: int, t: int, task: Dataset, variant: str, source, vdir: Path, progress):
        spec = self.spec
        model = self.model_fn(0)
        model.load_state_dict(source)
        kwargs = dict(
            data_seed=self.seed(r, f"data/{t}"),
            aug_seed=self.seed(r, f"aug/{t}"),
            workdir=vdir,
            progress=progress,
        )
        if variant == "supsup":
            freeze(model)
            gen = torch.Generator().manual_seed(self.seed(r, f"scores/{t}"))
            scores = {k: score_init(w, gen) for k, w in prunable_weights(model).items()}
            handle = attach(model, scores=scores, mode="topk", density=spec.density)
            trained = sum(s.numel() for s in handle.scores.values())
            try:
                label = f"rep {r} task {t} supsup ({trained} scores)"
                metrics = train(model, task, spec, None, label=label, **kwargs)
                mask = handle.current_mask()
                save_state(vdir / "scores.safetensors", dict(handle.scores))
            finally:
                handle.detach(bake=False)
            mask.save(vdir / "mask.safetensors")
            density = mask.density()
            density_all = model_density(mask.apply_(copy.deepcopy(model)))
        else:
            if variant == "film":
                names = film_parameters(model, spec.train_output)
            else:
                names = [n for n, _ in model.named_parameters()]
            trained = freeze_except(model, names)
            if not (vdir / "weights_start.safetensors").exists():
                save_state(vdir / "weights_start.safetensors", snapshot(model))
            label = f"rep {r} task {t} {variant} ({trained} params)"
            metrics = train(model, task, spec, None, label=label, **kwargs)
            save_state(vdir / "weights_end.safetensors", snapshot(model))
            density = Mask.dense(model).density()
            density_all = model_density(model)
        return {
            "method": spec.method,
            "replicate": r,
            "level": t,
            "variant": variant,
            "density": density,
            "density_all": density_all,
            **metrics,
            "status": "done",
            "task": t,
            "task_kind": spec.task_kind,
            "trained_params": trained,
        }


def _source_summary(run_dir: str) -> str:
    """What the source run trained, from its spec.json, for an error message."""
    path = Path(run_dir) / "spec.json"
    if not path.exists():
        return ""
    s = read_json(path).get("spec", {})
    return (
        f"; that run trained model '{s.get('model')}' width {s.get('width')} "
        f"on '{s.get('dataset')}'"
    )


__all__ = [
    "AdaptExperiment",
    "AdaptSpec",
    "FiLM",
    "VARIANTS",
    "add_film",
    "film_parameters",
]
