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
task with the most negative gradient is picked.

Results: ``level`` is the last trained task (``trained_task``); variant
``task-given`` has one row per evaluated task (``eval_task``), variant
``task-inferred`` one row with the accuracy when the id is inferred (over all
learned tasks' test sets) and ``inference_accuracy``, the fraction of batches
whose task was identified.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data import Dataset
from ..errors import UsageError
from ..forward_mask import MaskedWeights, attach, score_init
from ..masks import Mask, model_density, prunable_weights
from ..models import build
from ..runs import RESULT_COLUMNS, read_json, write_csv, write_json
from ..spec import derive_seed
from ..train import evaluate, train
from .lottery import Experiment, collect_results, save_state
from .supermask import SupermaskSpec, prepare_weights

TASK_KINDS = ("permuted", "split")
COLUMNS = ["trained_task", "eval_task", "inference_accuracy", "task_kind"]


@dataclass(frozen=True)
class SupsupSpec(SupermaskSpec):
    """Knobs of ``ticketlab supsup``: the supermask knobs plus the task sequence."""

    method: str = "supsup"
    tasks: int = 3
    task_kind: str = "permuted"
    weights_kind: str = "signed-constant"
    inference_batch_size: int = 128

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
        if self.weights is not None:
            raise UsageError("supsup uses a frozen random network; --weights is not supported")


def _subset(x: torch.Tensor, y: torch.Tensor, pair: tuple[int, int]):
    keep = (y == pair[0]) | (y == pair[1])
    return x[keep], (y[keep] == pair[1]).long()


def make_task(data: Dataset, kind: str, t: int, seed: int) -> Dataset:
    """Task ``t`` of the sequence: a permutation of the inputs or a class pair."""
    if kind == "permuted":
        n = math.prod(data.input_shape)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))

        def tf(x):
            return x.flatten(1)[:, perm].reshape(x.shape)

        splits = {s: (tf(getattr(data, f"x_{s}")), getattr(data, f"y_{s}")) for s in
                  ("train", "val", "test")}  # fmt: skip
        classes = data.num_classes
    else:
        pair = (2 * t, 2 * t + 1)
        splits = {
            s: _subset(getattr(data, f"x_{s}"), getattr(data, f"y_{s}"), pair)
            for s in ("train", "val", "test")
        }
        classes = 2
    return Dataset(
        name=f"{data.name}/{kind}-{t}",
        x_train=splits["train"][0],
        y_train=splits["train"][1],
        x_val=splits["val"][0],
        y_val=splits["val"][1],
        x_test=splits["test"][0],
        y_test=splits["test"][1],
        num_classes=classes,
    )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(1).mean()


def infer_task(handle: MaskedWeights, model: nn.Module, masks: list[Mask], x: torch.Tensor) -> int:
    """One-shot task inference: the task whose mixture coefficient most lowers the entropy."""
    n = len(masks)
    alpha = torch.full((n,), 1.0 / n, requires_grad=True)
    stacked = {
        name: torch.stack([m[name].to(torch.float32) for m in masks]) for name in handle.names()
    }
    factors = {name: torch.einsum("t,t...->...", alpha, s) for name, s in stacked.items()}
    handle.set_factors(factors)
    try:
        (grad,) = torch.autograd.grad(entropy(model(x)), alpha)
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
        if spec.task_kind == "split" and model_fn is None:
            shape = self.data.input_shape

            def two_way(seed: int) -> nn.Module:
                return build(spec.model, shape, 2, spec.width, spec.init, seed)

            self.model_fn = two_way
        probe = self.model_fn(0)
        if any(isinstance(m, nn.modules.batchnorm._NormBase) for m in probe.modules()):
            raise UsageError(
                "supsup needs a model without BatchNorm (its running statistics would be "
                "shared by all tasks)"
            )

    def run(self, progress=None) -> list[dict]:
        super().run(progress)
        return sorted_results(self.dir)

    def tasks(self, r: int) -> list[Dataset]:
        spec = self.spec
        return [
            make_task(self.data, spec.task_kind, t, derive_seed(spec.seed, t, "supsup/task"))
            for t in range(spec.tasks)
        ]

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
            if (ldir / "task-inferred" / "result.json").exists():
                continue
            self._evaluate(model, tasks[: t + 1], masks, r, t, ldir, train_metrics)
            write_csv(self.dir / "results.csv", sorted_results(self.dir), RESULT_COLUMNS + COLUMNS)

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
                    guess = infer_task(handle, model, masks, x)
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
            }
            write_json(ldir / "task-inferred" / "result.json", row)
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


__all__ = ["SupsupExperiment", "SupsupSpec", "infer_task", "make_task"]
