"""SupSup: one supermask per task over one frozen random network (Wortsman et al. 2020).

Tasks are made from one dataset: ``permuted`` (task t permutes the input
features with a fixed permutation seeded by the run's seed and t) or ``split``
(task t is the class pair (2t, 2t+1), relabelled 0/1; the network has 2
outputs). Each task trains an edge-popup mask (top ``density`` per layer) over
the same frozen weights; the masks of earlier tasks are kept as they are, so
their accuracy cannot change.

After task t, every task 0..t is evaluated with its own mask (task id given),
and the task id is inferred one-shot per test batch: the weights become
W * sum_i alpha_i M_i with alpha uniform over the learned tasks, one gradient of
the mean output entropy over the batch is taken with respect to alpha, and the
task with the most negative gradient is picked (the paper's One-Shot algorithm).
The objective is taken over the whole test batch (``inference_examples="batch"``,
the default) or over its first example only (``"first"``): the reference code
computes it on ``logits[:data_to_repeat]``, and its one-shot configs set
``data_to_repeat`` to 1. Either way the inferred task then classifies the whole batch.

Two objectives for that gradient (``inference_objective``):

- ``entropy`` (default): H(p) = -sum_c p_c log p_c, the mean over the batch;
- ``superfluous`` (section 3.6 and Lemma 1 of the paper): the output layer gets
  ``superfluous_neurons`` extra outputs (s-neurons) beyond the task's classes,
  which are never a label, so the cross-entropy of training pushes them down
  under each task's own mask. The objective is

      G(z) = log sum_{j=1..k+s} exp(z_j),  with the gradient stopped through
                                           the k real logits z_1..z_k,

  the batch mean over the logits z. Its gradient is dG/dz_j = softmax(z)_j for
  an s-neuron and 0 for a real one: exactly the gradient that training's
  cross-entropy gives the s-neurons. Descending it lowers the s-neurons, which
  the right task's mask was trained to do on this data.

The s-neurons stay in the output at training and evaluation (accuracy is the
argmax over all outputs, as in the paper's code); ``superfluous_neurons`` may
also be used with the entropy objective.

Results: ``level`` is the last trained task (``trained_task``); variant
``task-given`` has one row per evaluated task (``eval_task``), variant
``task-inferred`` one row with the accuracy when the id is inferred (over all
learned tasks' test sets) and ``inference_accuracy``, the fraction of batches
whose task was identified, ``inference_objective`` and ``inference_examples``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..data.tasks import TASK_KINDS, TASK_SEED_PURPOSE, task_sequence
from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..masks import Mask, model_density, prunable_weights
from ..masks.forward import MaskedWeights, attach, score_init
from ..masks.hopfield import HopfieldMemory, hamming, recall
from ..models import build
from ..runs import RESULT_COLUMNS, read_json, save_state, write_json
from ..spec import derive_seed
from ..train import evaluate, train
from .supermask import SupermaskSpec, prepare_weights

OBJECTIVES = ("entropy", "superfluous")
# where the masks are kept: as they are, or as attractors of one fixed-size Hopfield network
STORES = ("explicit", "hopfield")
# which examples of a test batch the one-shot objective is taken over
INFERENCE_EXAMPLES = ("batch", "first")
COLUMNS = ["trained_task", "eval_task", "inference_accuracy", "task_kind", "inference_objective"]
COLUMNS += ["inference_examples"]
# the columns of the Hopfield rows (only where --store hopfield)
HOPFIELD_COLUMNS = ["store", "stored_tasks", "hamming", "hamming_fraction", "attractor_flips"]
HOPFIELD_COLUMNS += ["store_numbers"]


@dataclass(frozen=True)
class SupsupSpec(SupermaskSpec):
    """Knobs of ``ticketlab supsup``: the supermask knobs plus the task sequence."""

    SETUP = (
        "Wortsman et al. 2020 (supsup experiments/GNu/MNISTPerm): RMSprop 1e-4, no schedule, "
        "batch 128, signed Kaiming constant weights"
    )
    SETUPS = {
        "edge-popup": dict(
            optimizer="rmsprop",
            lr=1e-4,
            momentum=0.0,
            weight_decay=0.0,
            schedule="constant",
            batch_size=128,
        )
    }

    method: str = "supsup"
    tasks: int = 3
    task_kind: str = "permuted"
    weights_kind: str = "signed-constant"
    inference_batch_size: int = 128
    inference_objective: str = "entropy"
    superfluous_neurons: int = 0  # extra output neurons, never a label (s-neurons)
    inference_examples: str = "batch"  # or "first": the objective on example 0 only
    # HopSupSup: the masks also stored in one Hopfield network per layer, and read back
    # from it at test time (the reference's recovery settings)
    store: str = "explicit"
    hopfield_gamma: float = 1.5e-3
    hopfield_lr: float = 500.0
    hopfield_momentum: float = 0.9
    hopfield_weight_decay: float = 1e-4
    hopfield_batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.algorithm != "edge-popup":
            raise UsageError("supsup learns edge-popup masks; --algorithm must be edge-popup")
        if self.task_kind not in TASK_KINDS:
            raise UsageError(
                f"unknown task kind '{self.task_kind}'; choose from: {', '.join(TASK_KINDS)}"
            )
        if self.tasks < 1:
            raise UsageError(f"tasks must be >= 1; got {self.tasks}")
        if self.inference_batch_size < 1:
            raise UsageError("inference batch size must be >= 1")
        if self.inference_objective not in OBJECTIVES:
            raise UsageError(
                f"unknown inference objective '{self.inference_objective}'; "
                f"choose from: {', '.join(OBJECTIVES)}"
            )
        check_inference_examples(self.inference_examples)
        if isinstance(self.superfluous_neurons, bool) or self.superfluous_neurons < 0:
            raise UsageError(f"superfluous neurons must be >= 0; got {self.superfluous_neurons}")
        if self.inference_objective == "superfluous" and self.superfluous_neurons == 0:
            raise UsageError(
                "--inference-objective superfluous needs --superfluous-neurons N > 0 "
                "(extra output neurons; the paper uses 90 beyond 10 classes)"
            )
        if self.weights is not None:
            raise UsageError("supsup uses a frozen random network; --weights is not supported")
        if self.store not in STORES:
            raise UsageError(f"unknown store '{self.store}'; choose from: {', '.join(STORES)}")
        for name in ("hopfield_gamma", "hopfield_lr", "hopfield_weight_decay"):
            value = getattr(self, name)
            if not (value >= 0 and value != float("inf")):
                raise UsageError(f"{name.replace('_', ' ')} must be finite and >= 0; got {value}")
        if not 0 <= self.hopfield_momentum < 1:
            raise UsageError(f"hopfield momentum must be in [0, 1); got {self.hopfield_momentum}")
        if self.hopfield_batch_size < 1:
            raise UsageError("hopfield batch size must be >= 1")


def check_inference_examples(examples: str) -> None:
    if examples not in INFERENCE_EXAMPLES:
        raise UsageError(
            f"unknown inference examples '{examples}'; choose from: {', '.join(INFERENCE_EXAMPLES)}"
        )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def superfluous_objective(logits: torch.Tensor, real: int) -> torch.Tensor:
    """SupSup's G: logsumexp over all outputs, with the gradient stopped through the real ones.

    ``logits`` are (batch, real + s); the first ``real`` are the task's classes, the
    rest the superfluous neurons. G = mean over the batch of log sum_j exp(z_j);
    dG/dz_j = softmax(z)_j / batch for an s-neuron and 0 for a real one.
    """
    if not 0 < real < logits.shape[1]:
        raise UsageError(f"the superfluous objective needs outputs beyond the {real} real ones")
    is_real = torch.arange(logits.shape[1], device=logits.device) < real
    z = torch.where(is_real, logits.detach(), logits)
    return z.logsumexp(1).mean()


def infer_task(
    handle: MaskedWeights,
    model: nn.Module,
    masks: list[Mask],
    x: torch.Tensor,
    objective: str = "entropy",
    real: int | None = None,
    examples: str = "batch",
) -> int:
    """One-shot task inference: the task whose mixture coefficient most lowers the objective.

    ``objective`` is ``entropy`` or ``superfluous`` (then ``real`` is the number of
    real classes; the outputs beyond it are the s-neurons). ``examples`` is ``batch``
    (the objective's mean over all of ``x``) or ``first`` (over ``x[0]`` only).
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"unknown inference objective '{objective}'")
    check_inference_examples(examples)
    if examples == "first":
        x = x[:1]  # no BatchNorm (refused): example 0's logits do not depend on the others
    n = len(masks)
    dev = handle.weight(handle.names()[0]).device  # stored masks load on the CPU
    alpha = torch.full((n,), 1.0 / n, requires_grad=True, device=dev)
    stacked = {
        name: torch.stack([m[name].to(dev, torch.float32) for m in masks])
        for name in handle.names()
    }
    factors = {name: torch.einsum("t,t...->...", alpha, s) for name, s in stacked.items()}
    handle.set_factors(factors)
    try:
        out = model(x)
        value = entropy(out) if objective == "entropy" else superfluous_objective(out, real)
        (grad,) = torch.autograd.grad(value, alpha)
    finally:
        handle.set_factors(None)
    return int(grad.argmin())


class SupsupExperiment(Experiment):
    """A SupSup run bound to ``<runs-dir>/supsup-<hash12>``."""

    def __init__(self, spec: SupsupSpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        classes = self.data.num_classes
        if spec.task_kind == "split" and spec.tasks > classes // 2:
            raise UsageError(
                f"{classes} classes make {classes // 2} class-pair tasks; asked for {spec.tasks}"
            )
        # each task's classes, then the superfluous neurons
        self.real_classes = 2 if spec.task_kind == "split" else classes
        outputs = self.real_classes + spec.superfluous_neurons
        shape = self.data.input_shape
        if model_fn is None and outputs != classes:

            def widened(seed: int) -> nn.Module:
                return build(spec.model, shape, outputs, spec.width, spec.init, seed)

            self.model_fn = widened
        probe = self.model_fn(0)
        if any(isinstance(m, nn.modules.batchnorm._NormBase) for m in probe.modules()):
            raise UsageError(
                "supsup needs a model without BatchNorm (its running statistics would be "
                "shared by all tasks)"
            )
        if spec.store == "hopfield":
            try:
                self.memory_shapes = {k: tuple(w.shape) for k, w in prunable_weights(probe).items()}
                HopfieldMemory(self.memory_shapes)
            except ValueError as exc:
                raise UsageError(
                    f"--store hopfield: {exc}; use a smaller network, e.g. --dataset mnist1d "
                    "--model mlp_32"
                ) from None
        if model_fn is not None and spec.superfluous_neurons:
            with torch.no_grad():
                width = probe(torch.zeros(1, *shape)).shape[1]
            if width != outputs:
                raise UsageError(
                    f"with {spec.superfluous_neurons} superfluous neurons the model needs "
                    f"{outputs} outputs; it has {width}"
                )

    def run(self, progress=None) -> list[dict]:
        super().run(progress)
        return sorted_results(self.dir)

    def tasks(self, r: int) -> list[Dataset]:
        spec = self.spec
        seeds = [derive_seed(spec.seed, t, TASK_SEED_PURPOSE) for t in range(spec.tasks)]
        return task_sequence(self.data, spec.task_kind, seeds)

    def _replicate(self, r: int, levels: int, progress) -> None:
        spec = self.spec
        rdir = self.dir / f"replicate-{r}"
        model = self.model_fn(self.seed(r, "init"))
        prepare_weights(
            model, spec.weights_kind, spec.init, spec.density if spec.scale_fan else None
        )
        for p in model.parameters():
            p.requires_grad_(False)
        tasks = self.tasks(r)
        masks: list[Mask] = []
        hopfield = spec.store == "hopfield"
        memory = HopfieldMemory(self.memory_shapes) if hopfield else None
        columns = RESULT_COLUMNS + COLUMNS + (HOPFIELD_COLUMNS if hopfield else [])
        for t, task in enumerate(tasks):
            ldir = rdir / f"level-{t}"
            mask_path = ldir / "mask.safetensors"
            train_metrics = None
            if mask_path.exists():
                mask = Mask.load(mask_path)
            else:
                mask, train_metrics = self._train_task(model, task, r, t, ldir / "train", progress)
                mask.save(mask_path)
            masks.append(mask)
            if hopfield:  # the memory after task t: a function of the masks, in order
                memory.store(mask)
                if not (ldir / "hopfield.safetensors").exists():
                    save_state(ldir / "hopfield.safetensors", memory.state_dict())
                if not all((ldir / f"hopfield-{e}" / "result.json").exists() for e in range(t + 1)):
                    self._evaluate_hopfield(model, tasks[: t + 1], masks, memory, r, t, ldir)
                    self.write_results(sorted_results(self.dir), columns)
            if (ldir / "task-inferred" / "result.json").exists():
                continue
            self._evaluate(model, tasks[: t + 1], masks, r, t, ldir, train_metrics)
            self.write_results(sorted_results(self.dir), columns)

    def _train_task(self, model, task: Dataset, r: int, t: int, wdir: Path, progress):
        spec = self.spec
        gen = torch.Generator().manual_seed(self.seed(r, f"scores/{t}"))
        scores = {k: score_init(w, gen) for k, w in prunable_weights(model).items()}
        handle = attach(model, scores=scores, mode="topk", density=spec.density)
        try:
            metrics = train(
                model,
                task,
                spec,
                None,
                data_seed=self.seed(r, f"data/{t}"),
                aug_seed=self.seed(r, f"aug/{t}"),
                workdir=wdir,
                progress=progress,
                label=f"rep {r} task {t}",
            )
            mask = handle.current_mask()
            save_state(wdir / "scores.safetensors", dict(handle.scores))
        finally:
            handle.detach(bake=False)
        (wdir / "checkpoint.safetensors").unlink(missing_ok=True)
        write_json(wdir / "train.json", metrics)
        return mask, metrics

    def _evaluate(self, model, tasks, masks, r: int, t: int, ldir: Path, train_metrics) -> None:
        spec = self.spec
        if train_metrics is None and (ldir / "train" / "train.json").exists():
            train_metrics = read_json(ldir / "train" / "train.json")
        handle = attach(model)
        base = {"method": spec.method, "replicate": r, "level": t, "trained_task": t}
        try:
            for e, task in enumerate(tasks):
                handle.set_mask(masks[e])
                test_loss, test_acc = evaluate(
                    model, task.x_test, task.y_test, spec.eval_batch_size
                )
                val_loss, val_acc = evaluate(model, task.x_val, task.y_val, spec.eval_batch_size)
                row = {
                    **base,
                    "variant": "task-given",
                    "density": masks[e].density(),
                    "density_all": _density_all(model, masks[e]),
                    "test_accuracy": test_acc,
                    "test_loss": test_loss,
                    "val_accuracy": val_acc,
                    "val_loss": val_loss,
                    "test_accuracy_at_best_val": test_acc,
                    "status": "done",
                    "eval_task": e,
                    "task_kind": spec.task_kind,
                }
                if e == t and train_metrics is not None:
                    for k in ("best_val_step", "train_loss", "train_accuracy", "steps"):
                        row[k] = train_metrics[k]
                    row["train_seconds"] = train_metrics["train_seconds"]
                    row["test_accuracy_at_best_val"] = train_metrics["test_accuracy_at_best_val"]
                write_json(ldir / f"task-{e}" / "result.json", row)
            right = correct = total = batches = 0
            model.eval()
            for e, task in enumerate(tasks):
                for i in range(0, len(task.y_test), spec.inference_batch_size):
                    x = task.x_test[i : i + spec.inference_batch_size]
                    y = task.y_test[i : i + spec.inference_batch_size]
                    guess = infer_task(
                        handle,
                        model,
                        masks,
                        x,
                        spec.inference_objective,
                        self.real_classes,
                        spec.inference_examples,
                    )
                    right += int(guess == e)
                    batches += 1
                    handle.set_mask(masks[guess])
                    with torch.no_grad():
                        correct += int((model(x).argmax(1) == y).sum())
                    total += len(y)
            row = {
                **base,
                "variant": "task-inferred",
                "density": sum(m.density() for m in masks) / len(masks),
                "test_accuracy": correct / total if total else float("nan"),
                "status": "done",
                "eval_task": "all",
                "inference_accuracy": right / batches if batches else float("nan"),
                "task_kind": spec.task_kind,
                "inference_objective": spec.inference_objective,
                "inference_examples": spec.inference_examples,
            }
            write_json(ldir / "task-inferred" / "result.json", row)
        finally:
            handle.detach(bake=False)

    def _evaluate_hopfield(self, model, tasks, masks, memory, r: int, t: int, ldir: Path):
        """Each learned task's mask read back from the Hopfield memory alone (no task id,
        no stored mask: the superposition of the patterns, then SGD on the entropy of
        the task's test batches fading into the Hopfield energy), its Hamming distance
        to the mask that was stored, and the test accuracy with it."""
        spec = self.spec
        handle = attach(model)
        d = sum(memory.size.values())
        try:
            for e, task in enumerate(tasks):
                if (ldir / f"hopfield-{e}" / "result.json").exists():
                    continue
                b = spec.hopfield_batch_size
                starts = list(range(0, len(task.y_test), b))
                model.eval()

                def objective(k, factors, x_test=task.x_test, starts=starts, b=b):
                    handle.set_factors(factors)
                    try:
                        out = model(x_test[starts[k] : starts[k] + b])
                    finally:
                        handle.set_factors(None)
                    if spec.inference_objective == "entropy":
                        return entropy(out)
                    return superfluous_objective(out, self.real_classes)

                found = recall(
                    memory,
                    objective,
                    len(starts),
                    gamma=spec.hopfield_gamma,
                    lr=spec.hopfield_lr,
                    momentum=spec.hopfield_momentum,
                    weight_decay=spec.hopfield_weight_decay,
                )
                handle.set_mask(found)
                test_loss, test_acc = evaluate(
                    model, task.x_test, task.y_test, spec.eval_batch_size
                )
                distance = hamming(found, masks[e])
                row = {
                    "method": spec.method,
                    "replicate": r,
                    "level": t,
                    "trained_task": t,
                    "variant": "hopfield",
                    "eval_task": e,
                    "density": found.density(),
                    "test_accuracy": test_acc,
                    "test_loss": test_loss,
                    "status": "done",
                    "task_kind": spec.task_kind,
                    "inference_objective": spec.inference_objective,
                    "store": "hopfield",
                    "stored_tasks": t + 1,
                    "hamming": distance,
                    "hamming_fraction": distance / d,
                    # 0 while the stored mask is still an attractor (below capacity)
                    "attractor_flips": memory.unstable(masks[e]),
                    "store_numbers": memory.numel(),
                }
                write_json(ldir / f"hopfield-{e}" / "result.json", row)
        finally:
            handle.detach(bake=False)


def sorted_results(run_dir: Path) -> list[dict]:
    """The lottery's row order, then the evaluated task."""
    rows = collect_results(run_dir)
    return sorted(
        rows, key=lambda r: (r["replicate"], r["level"], r["variant"], str(r["eval_task"]))
    )


def _density_all(model: nn.Module, mask: Mask) -> float:
    import copy

    return model_density(mask.apply_(copy.deepcopy(model)))


__all__ = [
    "SupsupExperiment",
    "SupsupSpec",
    "infer_task",
    "superfluous_objective",
]
