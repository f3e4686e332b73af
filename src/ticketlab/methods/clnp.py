"""Continual learning via neural pruning (CLNP; Golkar, Kagan & Cho 2019).

Tasks arrive one after another (the sequences of ``supsup``: ``permuted`` inputs or
``split`` class pairs, drawn from the same seeds). The network is a fully connected
ReLU network (``lenet_300_100``, ``mlp_<w1>_<w2>...``) with one output head per task.
Every hidden unit is either *used* (by some earlier task) or *free*.

Task t:

1. **Start.** The free units get fresh incoming weights and biases (a new draw of
   the model's init) and the task gets a fresh head.
2. **Train** the free units' incoming weights and biases (from every unit of the
   layer below, used or free: earlier features are reused) and the head, with an L1
   penalty ``l1`` on those weights (its subgradient ``l1 * sign(w)``). Used units
   are frozen: after every optimizer step their weights and biases are put back.
   Weights from free units into used units (the *interference* weights) are zero
   and stay so.
3. **Prune.** Each newly trained unit's mean activation over the task's validation
   inputs is its activity. Units whose activity is at most a threshold are pruned
   (their incoming weights, bias and outgoing weights set to zero) and stay free;
   the threshold is the largest of the candidates (0 and quantiles of the
   activities, in increasing order, until the first that fails) at which the
   validation accuracy drops by at most ``margin`` (graceful forgetting). The kept
   units become used; the free units' weights into them are zero from now on.

So an earlier task's output is a function of its own used units and its head
only, all frozen, and every path into them from units trained later has weight
zero: its outputs, hence its accuracy, are bit for bit unchanged by later tasks.

``baseline="finetune"`` is plain sequential fine-tuning for comparison: every
weight trains on every task (no penalty, no pruning, nothing frozen), each task
with its own fresh head, so earlier tasks forget through the shared body.

Results: ``level`` is the last trained task (``trained_task``); after each task
one row per task learned so far (``eval_task``), variant ``clnp`` or
``finetune``, with ``units_claimed`` (hidden units task t took),
``capacity_used`` (fraction of hidden units used after task t), ``units_per_layer``
(used/total per hidden layer), ``prune_threshold`` and
``val_accuracy_before_prune``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data import Dataset
from ..data.tasks import TASK_KINDS, TASK_SEED_PURPOSE, task_sequence
from ..errors import UsageError
from ..experiment import Experiment, collect_results
from ..models.mlp import MLP
from ..runs import RESULT_COLUMNS, load_state, read_json, save_state, write_json
from ..spec import Spec, derive_seed
from ..train import evaluate, train

BASELINES = ("finetune",)
COLUMNS = ["trained_task", "eval_task", "task_kind", "units_claimed", "capacity_used"]
COLUMNS += ["units_per_layer", "prune_threshold", "val_accuracy_before_prune"]
# how many quantiles of the new units' activities the threshold search tries
THRESHOLD_CANDIDATES = 32


@dataclass(frozen=True)
class ClnpSpec(Spec):
    """Knobs of ``ticketlab clnp``: the training knobs plus the task sequence, the L1
    penalty and the graceful-forgetting margin."""

    SETUP = (
        "Golkar et al. 2019: fully connected ReLU network, a head per task, L1 weight "
        "penalty, units pruned by mean activation within a validation-accuracy margin "
        "(graceful forgetting); training as ticketlab's LeNet setup (Adam 1.2e-3, batch 60)"
    )

    method: str = "clnp"
    tasks: int = 3
    task_kind: str = "permuted"
    l1: float = 1e-4  # L1 penalty on the trained weights (subgradient added to the grads)
    margin: float = 0.01  # validation accuracy the pruning of a task may cost
    baseline: str | None = None  # "finetune": plain sequential fine-tuning instead

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task_kind not in TASK_KINDS:
            raise UsageError(
                f"unknown task kind '{self.task_kind}'; choose from: {', '.join(TASK_KINDS)}"
            )
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 1:
            raise UsageError(f"tasks must be an integer >= 1; got {self.tasks}")
        if not self.l1 >= 0 or self.l1 == float("inf"):
            raise UsageError(f"l1 must be a finite number >= 0; got {self.l1}")
        if not 0 <= self.margin < 1:
            raise UsageError(f"margin must be in [0, 1); got {self.margin}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise UsageError(
                f"unknown baseline '{self.baseline}'; choose from: {', '.join(BASELINES)}"
            )


def hidden_activations(model: MLP, x: torch.Tensor) -> list[torch.Tensor]:
    """Each hidden layer's ReLU output for inputs ``x``."""
    out, h = [], x.flatten(1)
    for layer in model.hidden:
        h = layer(h).relu()
        out.append(h)
    return out


def set_head(model: MLP, head: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        model.fc.weight.copy_(head["weight"])
        model.fc.bias.copy_(head["bias"])


def task_logits(model: MLP, heads: list[dict], task: int, x: torch.Tensor) -> torch.Tensor:
    """The network's output for ``task``: the shared hidden layers, then its head."""
    set_head(model, heads[task])
    with torch.no_grad():
        return model(x)


class FreezeUnits:
    """Training callback: the L1 subgradient on the trainable weights before each step,
    and every frozen entry (used units' weights and biases, interference weights) put
    back to its value at the start after each step, whatever the optimizer did."""

    def __init__(self, model: nn.Module, trainable: dict[str, torch.Tensor], l1: float):
        params = dict(model.named_parameters())
        self.params = {n: params[n] for n in trainable}
        self.trainable = trainable
        self.fixed = {n: p.detach().clone() for n, p in self.params.items()}
        self.l1 = l1

    def before_step(self, step, model, optimizer) -> None:
        if not self.l1:
            return
        with torch.no_grad():
            for n, p in self.params.items():
                if n.endswith("weight") and p.grad is not None:
                    p.grad.add_(self.l1 * torch.sign(p) * self.trainable[n])

    def after_step(self, step, model, optimizer, keeper, x, y) -> None:
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(torch.where(self.trainable[n], p, self.fixed[n]))


def trainable_entries(model: MLP, used: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """What task training may change: the free units' incoming weights and biases, and
    the head. The rest (used units, interference weights) is frozen."""
    out = {}
    for i, (layer, u) in enumerate(zip(model.hidden, used)):
        free = ~u
        out[f"hidden.{i}.weight"] = free[:, None].expand_as(layer.weight).clone()
        out[f"hidden.{i}.bias"] = free.clone()
    out["fc.weight"] = torch.ones_like(model.fc.weight, dtype=torch.bool)
    out["fc.bias"] = torch.ones_like(model.fc.bias, dtype=torch.bool)
    return out


@torch.no_grad()
def cut_units(model: MLP, units: list[torch.Tensor]) -> None:
    """Prune hidden units: incoming weights, bias and outgoing weights to zero."""
    layers = [*model.hidden, model.fc]
    for i, u in enumerate(units):
        layers[i].weight[u] = 0.0
        layers[i].bias[u] = 0.0
        layers[i + 1].weight[:, u] = 0.0


@torch.no_grad()
def cut_interference(model: MLP, used: list[torch.Tensor]) -> None:
    """Zero the weights from free units into used ones (layer l-1 free -> layer l used)."""
    for i in range(1, len(model.hidden)):
        w = model.hidden[i].weight
        w[used[i][:, None] & ~used[i - 1][None, :]] = 0.0


@torch.no_grad()
def prune_task(model: MLP, used: list[torch.Tensor], task: Dataset, margin: float, batch: int):
    """CLNP's pruning of the units a task just trained (see the module docstring).

    Returns ``(kept, threshold, accuracy before, accuracy after)``; ``kept`` is, per
    layer, the new units that stay (they become used). The model is left pruned."""
    x, y = (task.x_val, task.y_val) if len(task.y_val) else (task.x_train, task.y_train)
    new = [~u for u in used]
    activity = [a.mean(0) for a in hidden_activations(model, x)]
    _, before = evaluate(model, x, y, batch)
    pool = torch.cat([a[n] for a, n in zip(activity, new)])
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    chosen, threshold, after = [torch.zeros_like(n) for n in new], float("nan"), before
    if len(pool):
        grid = torch.linspace(0, 1, THRESHOLD_CANDIDATES + 1).double().to(pool.device)
        qs = torch.quantile(pool.double(), grid)
        candidates = sorted({0.0, *(float(q) for q in qs)})
        for theta in candidates:
            cut = [n & (a <= theta) for a, n in zip(activity, new)]
            model.load_state_dict(saved)
            cut_units(model, cut)
            _, acc = evaluate(model, x, y, batch)
            if acc < before - margin:
                break
            chosen, threshold, after = cut, theta, acc
    model.load_state_dict(saved)
    cut_units(model, chosen)
    kept = [n & ~c for n, c in zip(new, chosen)]
    return kept, threshold, before, after


class ClnpExperiment(Experiment):
    """A CLNP (or fine-tuning baseline) run bound to ``<runs-dir>/clnp-<hash12>``."""

    def __init__(self, spec: ClnpSpec, data=None, model_fn=None, model_id=None):
        super().__init__(spec, data=data, model_fn=model_fn, model_id=model_id)
        classes = self.data.num_classes
        if spec.task_kind == "split" and spec.tasks > classes // 2:
            raise UsageError(
                f"{classes} classes make {classes // 2} class-pair tasks; asked for {spec.tasks}"
            )
        self.outputs = 2 if spec.task_kind == "split" else classes
        shape = self.data.input_shape
        if model_fn is None and self.outputs != classes:
            from ..models import build

            def narrowed(seed: int) -> nn.Module:
                return build(spec.model, shape, self.outputs, spec.width, spec.init, seed)

            self.model_fn = narrowed
        probe = self.model_fn(0)
        if not isinstance(probe, MLP) or probe.acts is not None:
            raise UsageError(
                "clnp prunes hidden units of a fully connected ReLU network: use "
                "lenet_300_100 or mlp_<w1>_<w2>... (no k-winners)"
            )

    def run(self, progress=None) -> list[dict]:
        super().run(progress)
        return sorted_results(self.dir)

    def tasks(self) -> list[Dataset]:
        spec = self.spec
        seeds = [derive_seed(spec.seed, t, TASK_SEED_PURPOSE) for t in range(spec.tasks)]
        return task_sequence(self.data, spec.task_kind, seeds)

    # the stored network after a task ---------------------------------------------
    def network(self, r: int, t: int) -> tuple[MLP, list[dict], list[torch.Tensor]]:
        """The network after task ``t`` of replicate ``r``: the model, one head per
        learned task, and the used units per hidden layer."""
        state = load_state(self.dir / f"replicate-{r}" / f"level-{t}" / "state.safetensors")
        model = self.model_fn(0)
        model.load_state_dict(
            {k[len("model.") :]: v for k, v in state.items() if k[:6] == "model."}
        )
        heads = [
            {"weight": state[f"head.{e}.weight"], "bias": state[f"head.{e}.bias"]}
            for e in range(t + 1)
        ]
        dev = model.fc.weight.device  # stored on the CPU, used beside the model
        used = [state[f"used.{i}"].to(dev) for i in range(len(model.hidden))]
        return model, heads, used

    def _save_network(self, path: Path, model, heads, used) -> None:
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        for e, h in enumerate(heads):
            state[f"head.{e}.weight"], state[f"head.{e}.bias"] = h["weight"], h["bias"]
        for i, u in enumerate(used):
            state[f"used.{i}"] = u
        save_state(path, state)

    # one replicate -----------------------------------------------------------------
    def _replicate(self, r: int, levels: int, progress) -> None:
        rdir = self.dir / f"replicate-{r}"
        tasks = self.tasks()
        model = self.model_fn(self.seed(r, "init"))
        used = [
            torch.zeros(layer.out_features, dtype=torch.bool, device=layer.weight.device)
            for layer in model.hidden
        ]
        heads: list[dict] = []
        for t, task in enumerate(tasks):
            ldir = rdir / f"level-{t}"
            state_path = ldir / "state.safetensors"
            if state_path.exists():
                model, heads, used = self.network(r, t)
                info = read_json(ldir / "task.json")
            else:
                info = self._train_task(model, heads, used, task, r, t, ldir, progress)
                self._save_network(state_path, model, heads, used)
            if all((ldir / f"task-{e}" / "result.json").exists() for e in range(t + 1)):
                continue
            self._evaluate(model, heads, used, tasks[: t + 1], r, t, ldir, info)
            self.write_results(sorted_results(self.dir), RESULT_COLUMNS + COLUMNS)

    def _start_task(self, model: MLP, used, r: int, t: int) -> None:
        """Fresh incoming weights for the free units (all of them for fine-tuning's
        first task only) and a fresh head, from a new draw of the init."""
        fresh = self.model_fn(self.seed(r, f"init/{t}"))
        with torch.no_grad():
            if self.spec.baseline is None and t > 0:
                for layer, new, u in zip(model.hidden, fresh.hidden, used):
                    layer.weight[~u] = new.weight[~u]
                    layer.bias[~u] = new.bias[~u]
                cut_interference(model, used)
            if t > 0:
                model.fc.load_state_dict(fresh.fc.state_dict())

    def _train_task(self, model, heads, used, task, r: int, t: int, ldir: Path, progress) -> dict:
        spec = self.spec
        self._start_task(model, used, r, t)
        clnp = spec.baseline is None
        callbacks = []
        if clnp:
            callbacks.append(FreezeUnits(model, trainable_entries(model, used), spec.l1))
        metrics = train(
            model,
            task,
            spec,
            None,
            data_seed=self.seed(r, f"data/{t}"),
            aug_seed=self.seed(r, f"aug/{t}"),
            workdir=ldir / "train",
            progress=progress,
            label=f"rep {r} task {t}",
            callbacks=callbacks,
        )
        info = {"metrics": metrics}
        if clnp:
            kept, threshold, before, after = prune_task(
                model, used, task, spec.margin, spec.eval_batch_size
            )
            for i, k in enumerate(kept):
                used[i] = used[i] | k
            cut_interference(model, used)
            info.update(
                units_claimed=int(sum(int(k.sum()) for k in kept)),
                prune_threshold=threshold,
                val_accuracy_before_prune=before,
                val_accuracy_after_prune=after,
            )
        heads.append({k: v.detach().clone() for k, v in model.fc.state_dict().items()})
        (ldir / "train" / "checkpoint.safetensors").unlink(missing_ok=True)
        write_json(ldir / "task.json", info)
        return info

    def _evaluate(self, model, heads, used, tasks, r: int, t: int, ldir: Path, info) -> None:
        spec = self.spec
        clnp = spec.baseline is None
        total = sum(len(u) for u in used)
        base = {
            "method": spec.method,
            "replicate": r,
            "level": t,
            "trained_task": t,
            "variant": "clnp" if clnp else spec.baseline,
            "task_kind": spec.task_kind,
            "status": "done",
        }
        if clnp:
            base.update(
                units_claimed=info["units_claimed"],
                capacity_used=sum(int(u.sum()) for u in used) / total,
                units_per_layer=" ".join(f"{int(u.sum())}/{len(u)}" for u in used),
                prune_threshold=info["prune_threshold"],
                val_accuracy_before_prune=info["val_accuracy_before_prune"],
            )
        kept = sum(int((p != 0).sum()) for p in model.hidden.parameters())
        kept += sum(int((h["weight"] != 0).sum() + (h["bias"] != 0).sum()) for h in heads)
        every = sum(p.numel() for p in model.hidden.parameters()) + sum(
            h["weight"].numel() + h["bias"].numel() for h in heads
        )
        for e, task in enumerate(tasks):
            set_head(model, heads[e])
            test_loss, test_acc = evaluate(model, task.x_test, task.y_test, spec.eval_batch_size)
            val_loss, val_acc = evaluate(model, task.x_val, task.y_val, spec.eval_batch_size)
            row = {
                **base,
                "eval_task": e,
                "density": kept / every,
                "density_all": kept / every,
                "test_accuracy": test_acc,
                "test_loss": test_loss,
                "val_accuracy": val_acc,
                "val_loss": val_loss,
                "test_accuracy_at_best_val": test_acc,
            }
            if e == t:
                m = info["metrics"]
                for k in ("best_val_step", "train_loss", "train_accuracy", "steps"):
                    row[k] = m[k]
                row["train_seconds"] = m["train_seconds"]
            write_json(ldir / f"task-{e}" / "result.json", row)
        set_head(model, heads[t])


def sorted_results(run_dir: Path) -> list[dict]:
    rows = collect_results(run_dir)
    return sorted(rows, key=lambda r: (r["replicate"], r["level"], int(r["eval_task"])))


__all__ = [
    "BASELINES",
    "ClnpExperiment",
    "ClnpSpec",
    "FreezeUnits",
    "cut_interference",
    "hidden_activations",
    "prune_task",
    "task_logits",
]
