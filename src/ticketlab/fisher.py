"""The trace of the Fisher information over training (Achille, Rovere & Soatto 2019).

Achille et al. measure how much information the weights hold about the task by the
trace of the Fisher information matrix

    F = E_{x ~ data} E_{y ~ p_w(y|x)} [ grad_w log p_w(y|x) grad_w log p_w(y|x)^T ],

so ``tr F`` is the mean over examples of the squared norm of the per-example gradient
of the log-likelihood, with the label *sampled from the model* (not the data's label:
that would be what Kunstner et al. 2019 call the "empirical Fisher"). One label is
drawn per example, seeded; ``exact=True`` sums over the classes weighted by p_w(y|x)
instead, the expectation over y without sampling noise. Per-example gradients come
from ``torch.func`` (``vmap`` of ``grad`` through ``functional_call``), in eval mode
(BatchNorm uses its running statistics).

For a pruned network only its own parameters count: the gradients of pruned weights
are masked out, so a ticket's trace is that of the subnetwork. The trace is also
given per layer (the module owning the parameters: a layer's weight and bias).

:func:`fisher_runs` computes it at every weight file that ``--save-every`` kept in a
run (the dense level and each ticket, every replicate) and writes ``fisher.csv``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .errors import UsageError
from .masks import Mask

FISHER_COLUMNS = ["replicate", "level", "variant", "density", "step", "layer", "trace"]


def layer_of(param_name: str) -> str:
    """The module a parameter belongs to: ``hidden.0.weight`` -> ``hidden.0``."""
    return param_name.rsplit(".", 1)[0] if "." in param_name else param_name


def fisher_trace(
    model: nn.Module,
    x: torch.Tensor,
    mask: Mask | None = None,
    *,
    seed: int = 0,
    exact: bool = False,
    batch_size: int = 32,
) -> dict[str, float]:
    """``tr F`` of ``model`` over the inputs ``x``: ``{"all": total, <layer>: part}``.

    Labels are drawn from the model's own predictive distribution with ``seed`` (one
    per example), or with ``exact`` averaged over every class weighted by its
    probability. With ``mask`` the pruned weights' gradients are left out.
    """
    if len(x) == 0:
        raise UsageError("the Fisher information needs at least one example")
    was_training = model.training
    model.eval()
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    keep = {k: m.to(params[k].dtype) for k, m in (mask.items() if mask is not None else [])}

    def log_prob(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        # a gather, not an index: vmap cannot index with a batched label
        return torch.log_softmax(out, dim=1)[0].gather(0, yi.view(1))[0]

    # small batches: the per-example gradients of a batch are batch x parameters floats,
    # and past the caches their cost grows faster than the batch (250 LeNet-300-100
    # examples at once took 35x the time of 50, on one core)
    per_example = vmap(grad(log_prob), in_dims=(None, 0, 0))
    gen = torch.Generator().manual_seed(seed)
    sums = {k: torch.zeros((), dtype=torch.float64) for k in params}
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size]
        with torch.no_grad():
            probs = torch.softmax(functional_call(model, (params, buffers), (xb,)), dim=1)
        if exact:  # E_y exactly: every class, weighted by p(y|x)
            choices = [(torch.full((len(xb),), c), probs[:, c]) for c in range(probs.shape[1])]
        else:
            y = torch.multinomial(probs.double().cpu(), 1, generator=gen)[:, 0].to(xb.device)
            choices = [(y, torch.ones(len(xb), dtype=probs.dtype, device=xb.device))]
        for y, weight in choices:
            grads = per_example(params, xb, y)
            for k, g in grads.items():
                if k in keep:
                    g.mul_(keep[k])
                sq = g.flatten(1).square().sum(1, dtype=torch.float64)
                sums[k] += (sq * weight.double()).sum().cpu()
            del grads
    model.train(was_training)
    out: dict[str, float] = {"all": 0.0}
    for k, s in sums.items():
        value = float(s) / len(x)
        out[layer_of(k)] = out.get(layer_of(k), 0.0) + value
        out["all"] += value
    return out


def saved_phases(run_dir: Path) -> list[tuple[int, int, str, Path]]:
    """(replicate, level, variant, variant dir) of every phase with saved weights."""
    found = []
    for vdir in sorted(Path(run_dir).glob("replicate-*/level-*/*/saved")):
        vdir = vdir.parent
        r = vdir.parent.parent.name.removeprefix("replicate-")
        level = vdir.parent.name.removeprefix("level-")
        if r.isdigit() and level.isdigit():
            found.append((int(r), int(level), vdir.name, vdir))
    found.sort(key=lambda t: (t[0], t[1], t[2] not in ("ticket", "dense"), t[2]))
    return found


def fisher_runs(
    run_dirs,
    examples: int = 1000,
    seed: int = 0,
    exact: bool = False,
    variants: tuple[str, ...] = ("ticket", "dense"),
    data_dir: str | None = None,
) -> dict[Path, list[dict]]:
    """``tr F`` (and per layer) at every saved step of each run's dense level and tickets
    (``variants``), on ``examples`` training inputs drawn by ``seed`` (the same for every
    step); writes ``<run>/fisher.csv``. Runs without saved weights (``--save-every``) are
    refused, unless another run given has them (they only mark steps in a report)."""
    from .data import load as load_data
    from .models import build
    from .runs import load_state, read_json, write_csv
    from .train import saved_steps

    if examples < 1:
        raise UsageError(f"examples must be >= 1; got {examples}")
    jobs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "spec.json").exists():
            raise UsageError(f"{d} is not a run directory (no spec.json there)")
        phases = [p for p in saved_phases(d) if p[2] in variants]
        jobs.append((d, read_json(d / "spec.json")["spec"], phases))
    if not any(p for _, _, p in jobs):
        raise UsageError(
            "no saved weights in the given runs: train with --save-every k (e.g. 100it) first"
        )
    out = {}
    for d, s, phases in jobs:
        if not phases:
            continue
        data = load_data(
            s["dataset"],
            data_dir=data_dir or s.get("data_dir"),
            val_size=s.get("val_size"),
            split_seed=s["seed"],
            augment=False,
        )
        n = min(examples, len(data.x_train))
        pick = torch.randperm(len(data.x_train), generator=torch.Generator().manual_seed(seed))
        x = data.x_train[pick[:n].sort().values]
        model = build(s["model"], data.input_shape, data.num_classes, s["width"], s["init"], 0)
        rows = []
        for r, level, variant, vdir in phases:
            mask_path = vdir / "mask.safetensors"
            mask = Mask.load(mask_path) if mask_path.exists() else None
            density = mask.density() if mask is not None else 1.0
            for step in saved_steps(vdir):
                state = load_state(vdir / "saved" / f"step-{step}.safetensors")
                model.load_state_dict(state)
                trace = fisher_trace(model, x, mask, seed=seed, exact=exact)
                for layer, value in trace.items():
                    rows.append(
                        {
                            "replicate": r,
                            "level": level,
                            "variant": variant,
                            "density": density,
                            "step": step,
                            "layer": layer,
                            "trace": value,
                        }
                    )
        write_csv(d / "fisher.csv", rows, FISHER_COLUMNS)
        out[d] = rows
    return out


__all__ = ["FISHER_COLUMNS", "fisher_runs", "fisher_trace", "layer_of", "saved_phases"]
