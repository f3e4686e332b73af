"""Supermasks: train a mask over frozen weights, never the weights themselves.

- ``edge-popup`` (Ramanujan et al. 2020): per layer, keep the top ``density`` of
  |scores|; the gradient reaches the scores straight through the top-k.
  Scores start kaiming-uniform-like (U(-1/sqrt(fan_in), 1/sqrt(fan_in))), as
  the reference does.
- ``bernoulli`` (Zhou et al. 2019): the mask is sampled from sigmoid(scores) at
  every forward pass in training, with a straight-through estimator; evaluation
  scores one binary mask, the one saved and counted in ``density``: sampled once
  from a seeded generator (``eval_mask="sampled"``, the default, as the reference
  samples at test time) or thresholded at sigmoid(s) > 0.5 (``threshold``);
  ``expected`` evaluates the soft sigmoid(scores), which is not a supermask; ``rescale``
  multiplies each layer by numel / kept of the realised mask (dynamic weight
  rescaling). ``density`` sets the initial keep probability; the learned
  density is reported (``learned_density``: mean keep probability).
- ``same-sign`` (Zhou et al. 2019, no training): the ``large_final_same_sign``
  mask of a trained run (``weights``), at ``density`` per layer, applied to that
  run's initial weights, and evaluated as is.

Frozen weights come from the model's init (``init``: kaiming normal/uniform,
...), optionally turned into signed constants (sign x the layer's init std)
and scaled by 1/sqrt(density) (edge-popup's "scale fan"); or, with
``weights=RUN_DIR``, from that run's trained level-0 weights (masking as
transfer). BatchNorm scale and shift stay at 1 and 0 (non-affine BN, as the
edge-popup configs use) unless ``bn_affine``.

Results add the columns ``algorithm``, ``weights_kind`` and ``learned_density``;
``variant`` is the algorithm, ``level`` is 0.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import UsageError
from ..experiment import Experiment, collect_results, run_on_module
from ..masks import Mask, model_density, prunable_weights
from ..masks.forward import EVAL_MASKS, MaskedWeights, attach, score_init
from ..models import layer_init_std
from ..protocols import snapshot
from ..runs import RESULT_COLUMNS, load_state, save_state, write_json
from ..spec import Spec
from ..train import evaluate, train

ALGORITHMS = ("edge-popup", "bernoulli", "same-sign")
WEIGHT_KINDS = ("init", "signed-constant")
COLUMNS = ["algorithm", "weights_kind", "learned_density"]


# each algorithm's training setup, for the fields a spec leaves at None
SETUPS = {
    # hidden-networks configs/smallscale: SGD 0.1, cosine, momentum 0.9, wd 1e-4, batch 128
    "edge-popup": dict(
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4, schedule="cosine", batch_size=128
    ),
    # deconstructing-lottery-tickets train_supermask.py (README command): SGD lr 100,
    # momentum 0.9, batch 250, no decay
    "bernoulli": dict(
        optimizer="sgd",
        lr=100.0,
        momentum=0.9,
        weight_decay=0.0,
        schedule="constant",
        batch_size=250,
    ),
}
SETUPS["same-sign"] = SETUPS["edge-popup"]  # trains nothing; evaluation batch only


def apply_setup(spec, setups: dict) -> None:
    """Fill the training fields ``spec`` leaves at None from its algorithm's setup."""
    if spec.algorithm not in setups:
        raise UsageError(f"unknown algorithm '{spec.algorithm}'; choose from: {', '.join(setups)}")
    filled = set()
    for name, value in setups[spec.algorithm].items():
        if getattr(spec, name) is None:
            object.__setattr__(spec, name, value)
            filled.add(name)
    if "momentum" in filled and spec.optimizer not in ("sgd", "rmsprop"):
        object.__setattr__(spec, "momentum", 0.0)  # the setup's momentum is its optimizer's


@dataclass(frozen=True)
class SupermaskSpec(Spec):
    """Knobs of ``ticketlab supermask`` on top of :class:`Spec`.

    The optimizer, learning rate, momentum, weight decay, schedule and batch size
    default to the algorithm's paper setup (:data:`SETUPS`) when left at None.
    """

    SETUP = (
        "edge-popup: Ramanujan et al. 2020 (hidden-networks small-scale configs): SGD 0.1, "
        "cosine, momentum 0.9, weight decay 1e-4, batch 128, Kaiming normal weights; "
        "bernoulli: Zhou et al. 2019 (train_supermask.py): SGD 100, momentum 0.9, batch 250"
    )
    SETUPS = SETUPS

    method: str = "supermask"
    init: str = "kaiming_normal"
    optimizer: str | None = None
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    schedule: str | None = None
    batch_size: int | None = None
    algorithm: str = "edge-popup"
    density: float = 0.5
    weights_kind: str = "init"
    scale_fan: bool = False
    bn_affine: bool = False
    eval_mask: str = "sampled"
    rescale: bool = False
    weights: str | None = None  # a trained run directory: frozen weights from its level 0

    def __post_init__(self) -> None:
        apply_setup(self, type(self).SETUPS)
        super().__post_init__()
        for name, value, choices in (
            ("algorithm", self.algorithm, ALGORITHMS),
            ("weights kind", self.weights_kind, WEIGHT_KINDS),
            ("eval mask", self.eval_mask, EVAL_MASKS),
        ):
            if value not in choices:
                raise UsageError(f"unknown {name} '{value}'; choose from: {', '.join(choices)}")
        if not isinstance(self.density, (int, float)) or not 0.0 < float(self.density) < 1.0:
            raise UsageError(f"density must be in (0, 1); got {self.density}")
        if self.algorithm == "same-sign" and self.weights is None:
            raise UsageError("--algorithm same-sign needs --weights RUN_DIR (a trained run)")


def trained_weights_dir(run_dir: str | Path, replicate: int = 0) -> Path:
    """The level-0 variant directory of a trained run (``ticket`` or ``dense``)."""
    base = Path(run_dir) / f"replicate-{replicate}" / "level-0"
    for variant in ("ticket", "dense"):
        d = base / variant
        if (d / "weights_end.safetensors").exists():
            return d
    raise UsageError(f"{run_dir} has no trained level-0 weights (replicate {replicate})")


@torch.no_grad()
def prepare_weights(model: nn.Module, kind: str, init: str, scale_fan: float | None) -> None:
    """Turn the frozen weights into signed constants and/or scale them by 1/sqrt(k)."""
    for w in prunable_weights(model).values():
        if kind == "signed-constant":
            w.copy_(torch.sign(w) * layer_init_std(w, init))
        if scale_fan is not None:
            w.mul_(1.0 / math.sqrt(scale_fan))


def freeze(model: nn.Module, bn_affine: bool = False) -> None:
    """Freeze every parameter; BN scale and shift stay trainable with ``bn_affine``."""
    for p in model.parameters():
        p.requires_grad_(False)
    if bn_affine:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.affine:
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)


def wrap(
    model: nn.Module,
    algorithm: str = "edge-popup",
    density: float = 0.5,
    *,
    seed: int = 0,
    eval_mask: str = "sampled",
    rescale: bool = False,
    bn_affine: bool = False,
) -> MaskedWeights:
    """Freeze ``model`` and attach learnable scores: the Python API for any ``nn.Module``.

    Train with :func:`ticketlab.train` (it trains parameters with ``requires_grad``:
    the scores), then read the plain mask with ``handle.current_mask()`` and
    remove the scores with ``handle.detach(bake=...)``.
    """
    if algorithm not in ("edge-popup", "bernoulli"):
        raise UsageError(f"unknown supermask algorithm '{algorithm}'; edge-popup or bernoulli")
    freeze(model, bn_affine)
    weights = prunable_weights(model)
    if algorithm == "edge-popup":
        gen = torch.Generator().manual_seed(seed)
        scores = {k: score_init(w, gen) for k, w in weights.items()}
        return attach(model, scores=scores, mode="topk", density=density)
    logit = math.log(density / (1.0 - density))
    scores = {k: torch.full(w.shape, logit, dtype=w.dtype) for k, w in weights.items()}
    handle = attach(
        model,
        scores=scores,
        mode="bernoulli",
        eval_mask=eval_mask,
        rescale=rescale,
        eval_seed=seed,
    )
    handle.generator = None  # sampling uses the global RNG, which checkpoints restore
    return handle


class SupermaskExperiment(Experiment):
    """A supermask run bound to ``<runs-dir>/supermask-<hash12>``."""

    def __init__(self, spec: SupermaskSpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        if spec.weights is not None:
            wdir = trained_weights_dir(spec.weights)
            probe = self.model_fn(0)
            state = load_state(wdir / "weights_end.safetensors")
            if sorted(state) != sorted(probe.state_dict()):
                raise UsageError(f"weights in {spec.weights} do not fit model '{spec.model}'")
            if spec.algorithm == "same-sign" and not (wdir / "weights_start.safetensors").exists():
                raise UsageError(f"{wdir} has no initial weights (weights_start.safetensors)")

    def _frozen_start(self, r: int) -> tuple[nn.Module, dict]:
        spec = self.spec
        model = self.model_fn(self.seed(r, "init"))
        if spec.weights is not None and spec.algorithm != "same-sign":
            model.load_state_dict(
                load_state(trained_weights_dir(spec.weights) / "weights_end.safetensors")
            )
        return model, {}

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec = self.spec
        vdir = self.dir / f"replicate-{r}" / "level-0" / spec.algorithm
        if (vdir / "result.json").exists():
            return
        vdir.mkdir(parents=True, exist_ok=True)
        if spec.algorithm == "same-sign":
            row = self._same_sign(r, vdir)
        else:
            row = self._train_scores(r, vdir, progress)
        write_json(vdir / "result.json", row)
        (vdir / "checkpoint.safetensors").unlink(missing_ok=True)
        self.write_results(collect_results(self.dir), RESULT_COLUMNS + COLUMNS)

    def _row(self, r: int, model: nn.Module, mask: Mask, learned: float, metrics: dict) -> dict:
        spec = self.spec
        return {
            "method": spec.method,
            "replicate": r,
            "level": 0,
            "variant": spec.algorithm,
            "density": mask.density(),
            "density_all": model_density(model),
            **metrics,
            "status": "done",
            "algorithm": spec.algorithm,
            "weights_kind": spec.weights_kind,
            "learned_density": learned,
        }

    def _train_scores(self, r: int, vdir: Path, progress) -> dict:
        spec = self.spec
        model, _ = self._frozen_start(r)
        prepare_weights(
            model, spec.weights_kind, spec.init, spec.density if spec.scale_fan else None
        )
        if not (vdir / "weights_start.safetensors").exists():
            save_state(vdir / "weights_start.safetensors", snapshot(model))
        handle = wrap(
            model,
            spec.algorithm,
            spec.density,
            seed=self.seed(r, "scores"),
            eval_mask=spec.eval_mask,
            rescale=spec.rescale,
            bn_affine=spec.bn_affine,
        )
        # bernoulli samples from the global RNG: seeded here, restored by checkpoints on resume,
        # and forked so the caller's RNG is left as it was
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed(r, "mask-sampling"))
            metrics = train(
                model,
                self.data,
                spec,
                None,
                data_seed=self.seed(r, "data"),
                aug_seed=self.seed(r, "aug"),
                workdir=vdir,
                progress=progress,
                label=f"rep {r} supermask {spec.algorithm} ({100 * spec.density:.0f}%)",
            )
        mask = handle.current_mask()
        learned = handle.expected_density()
        save_state(vdir / "scores.safetensors", dict(handle.scores))
        handle.detach(bake=False)
        save_state(vdir / "weights_end.safetensors", snapshot(model))
        mask.save(vdir / "mask.safetensors")
        baked = mask.apply_(copy.deepcopy(model))
        return self._row(r, baked, mask, learned, metrics)

    def _same_sign(self, r: int, vdir: Path) -> dict:
        from ..pruning import CRITERIA
        from ..pruning.allocation import select
        from ..pruning.criteria import Context

        spec = self.spec
        wdir = trained_weights_dir(spec.weights, 0)
        init_path = wdir / "weights_start.safetensors"
        if not init_path.exists():
            raise UsageError(f"{wdir} has no weights_start.safetensors")
        init_state = load_state(init_path)
        model = self.model_fn(0)
        model.load_state_dict(load_state(wdir / "weights_end.safetensors"))
        dense = Mask.dense(model)
        scores = CRITERIA["large_final_same_sign"](model, dense, Context(init_state=init_state))
        mask = select(scores, dense, spec.density, "layerwise", model=model)
        model.load_state_dict(init_state)
        prepare_weights(model, spec.weights_kind, spec.init, None)
        mask.apply_(model)
        mask.save(vdir / "mask.safetensors")
        save_state(vdir / "weights_end.safetensors", snapshot(model))
        metrics = zero_training_metrics(model, self.data, spec.eval_batch_size)
        return self._row(r, model, mask, mask.density(), metrics)


def zero_training_metrics(model: nn.Module, data, batch_size: int) -> dict:
    """The results columns for a network evaluated without training."""
    test_loss, test_acc = evaluate(model, data.x_test, data.y_test, batch_size)
    val_loss, val_acc = evaluate(model, data.x_val, data.y_val, batch_size)
    train_loss, train_acc = evaluate(model, data.x_train, data.y_train, batch_size)
    return {
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "val_accuracy": val_acc,
        "val_loss": val_loss,
        "best_val_step": 0,
        "test_accuracy_at_best_val": test_acc,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "steps": 0,
        "train_seconds": 0.0,
    }


def supermask(model: nn.Module, data, spec: SupermaskSpec, progress=None) -> list[dict]:
    """A supermask run on a user's own module (later replicates re-initialise it)."""
    return run_on_module(SupermaskExperiment, model, data, spec, progress)


__all__ = [
    "ALGORITHMS",
    "SupermaskExperiment",
    "SupermaskSpec",
    "freeze",
    "prepare_weights",
    "supermask",
    "wrap",
]
