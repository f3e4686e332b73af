"""Analyses of masks and trained networks: overlap, sign agreement, linear mode
connectivity (instability) and layer re-initialisation robustness.

- Jaccard overlap |A & B| / |A | B| and the normalised Hamming distance
  (fraction of positions where two masks differ), overall or per layer.
- Sign agreement: of the weights a mask keeps, the fraction whose final sign
  equals their initial sign (Zhou et al. 2019).
- Instability (Frankle et al. 2020): the maximum test error along the straight
  line between two networks' weights minus the mean of the two endpoints'
  errors. With BatchNorm, running statistics are recomputed at every point.
- Layer re-initialisation (Zhang et al. 2019, "Are all layers created equal?"):
  put one layer back to its initial value, or to fresh random values, and
  measure the test accuracy.
"""

from __future__ import annotations

import torch
from torch import nn

from .data import BatchSampler, Dataset
from .errors import UsageError
from .masks import Mask
from .train import evaluate

State = dict[str, torch.Tensor]


def _check_same_layers(a: Mask, b: Mask) -> None:
    if sorted(a.names()) != sorted(b.names()):
        raise UsageError("the masks cover different layers; they cannot be compared")
    for k in a.names():
        if a[k].shape != b[k].shape:
            raise UsageError(f"layer {k}: mask shapes {tuple(a[k].shape)} and {tuple(b[k].shape)}")


def jaccard(a: Mask, b: Mask) -> float:
    """|A & B| / |A | B| over all layers (1.0 when both are empty)."""
    _check_same_layers(a, b)
    inter = sum(int((a[k] & b[k]).sum()) for k in a.names())
    union = sum(int((a[k] | b[k]).sum()) for k in a.names())
    return inter / union if union else 1.0


def hamming(a: Mask, b: Mask) -> float:
    """Fraction of mask positions where ``a`` and ``b`` differ."""
    _check_same_layers(a, b)
    diff = sum(int((a[k] ^ b[k]).sum()) for k in a.names())
    total = sum(a[k].numel() for k in a.names())
    return diff / total if total else 0.0


def jaccard_per_layer(a: Mask, b: Mask) -> dict[str, float]:
    _check_same_layers(a, b)
    return {k: jaccard(Mask({k: a[k]}), Mask({k: b[k]})) for k in a.names()}


def hamming_per_layer(a: Mask, b: Mask) -> dict[str, float]:
    _check_same_layers(a, b)
    return {k: hamming(Mask({k: a[k]}), Mask({k: b[k]})) for k in a.names()}


def sign_agreement(final: State, initial: State, mask: Mask) -> float:
    """Of the kept weights, the fraction whose sign in ``final`` equals that in ``initial``."""
    same = kept = 0
    for k, m in mask.items():
        f, i = final[k][m], initial[k][m]
        same += int((torch.sign(f) == torch.sign(i)).sum())
        kept += int(m.sum())
    return same / kept if kept else float("nan")


# linear mode connectivity ---------------------------------------------------


def instability(errors: list[float]) -> float:
    """max error along the path minus the mean of the endpoints' errors."""
    if len(errors) < 2:
        raise UsageError("a path needs at least its two endpoints")
    return max(errors) - 0.5 * (errors[0] + errors[-1])


def interpolate_state(a: State, b: State, alpha: float) -> State:
    """(1 - alpha) a + alpha b for floating tensors; integer buffers are taken from ``a``."""
    out = {}
    for k, va in a.items():
        vb = b[k]
        out[k] = (1.0 - alpha) * va + alpha * vb if va.is_floating_point() else va.clone()
    return out


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def recompute_bn(model: nn.Module, data: Dataset, batches: int, batch_size: int, seed: int) -> int:
    """Reset BatchNorm running statistics and re-estimate them on ``batches`` training batches.

    The statistics are a cumulative (equal-weight) average over the batches, which
    are a fixed function of ``seed``. Returns the number of batches used (0 without BN).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or batches <= 0:
        return 0
    device = next(model.parameters()).device
    saved = [(m, m.momentum) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    sampler = BatchSampler(len(data.y_train), batch_size, seed)
    try:
        for step in range(batches):
            idx = sampler.indices(step)
            model(data.x_train[idx].to(device))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        model.train(was_training)
    return batches


def interpolation_path(
    model: nn.Module,
    a: State,
    b: State,
    data: Dataset,
    points: int = 30,
    bn_batches: int = 10,
    batch_size: int = 128,
    bn_seed: int = 0,
    eval_batch_size: int = 1000,
) -> list[dict]:
    """Test error and loss at ``points`` evenly spaced points from ``a`` (alpha=0) to ``b``.

    ``model`` is only a container: its weights are overwritten. Each row holds
    alpha, test_error, test_loss and bn_batches (batches used to recompute BN stats).
    """
    if points < 2:
        raise UsageError(f"path points must be >= 2; got {points}")
    device = next(model.parameters()).device
    x, y = data.x_test.to(device), data.y_test.to(device)
    rows = []
    for i in range(points):
        alpha = i / (points - 1)
        model.load_state_dict(interpolate_state(a, b, alpha))
        used = recompute_bn(model, data, bn_batches, batch_size, bn_seed)
        loss, acc = evaluate(model, x, y, eval_batch_size)
        rows.append(
            {"alpha": alpha, "test_error": 1.0 - acc, "test_loss": loss, "bn_batches": used}
        )
    return rows


# layer re-initialisation ----------------------------------------------------


def layer_reinit(
    model: nn.Module,
    trained: State,
    initial: State,
    fresh: State,
    data: Dataset,
    layers: list[str] | None = None,
    eval_batch_size: int = 1000,
) -> list[dict]:
    """Test accuracy with one layer at a time put back to ``initial`` or to ``fresh`` values.

    A layer is a module owning a prunable weight; its weight and bias are both replaced.
    The first row (layer ``none``) is the trained network itself.
    """
    from .masks import prunable_weights

    names = layers if layers is not None else list(prunable_weights(model))
    device = next(model.parameters()).device
    x, y = data.x_test.to(device), data.y_test.to(device)
    model.load_state_dict(trained)
    loss, acc = evaluate(model, x, y, eval_batch_size)
    rows = [{"layer": "none", "reset": "none", "test_accuracy": acc, "test_loss": loss}]
    for name in names:
        if name not in trained:
            raise UsageError(f"unknown layer '{name}'")
        prefix = name.rsplit(".", 1)[0] + "." if "." in name else ""
        keys = [k for k in trained if k.startswith(prefix) and k.count(".") == name.count(".")]
        for reset, source in (("initial", initial), ("random", fresh)):
            state = dict(trained)
            for k in keys:
                state[k] = source[k]
            model.load_state_dict(state)
            loss, acc = evaluate(model, x, y, eval_batch_size)
            rows.append({"layer": name, "reset": reset, "test_accuracy": acc, "test_loss": loss})
    model.load_state_dict(trained)
    return rows


# over run directories (``ticketlab compare`` and ``ticketlab layer-reinit``) -------------


def _check_runs(run_dirs) -> list:
    from pathlib import Path

    if not run_dirs:
        raise UsageError("give at least one run directory")
    out = []
    for d in run_dirs:
        p = Path(d)
        if not (p / "results.csv").exists():
            raise UsageError(f"no results in {d} (no results.csv there)")
        out.append(p)
    return out


def run_masks(run_dir, level: int | None = None) -> dict[str, tuple]:
    """Masks of a run: label -> (Mask, replicate, level, variant, variant dir)."""
    from pathlib import Path

    out = {}
    for vdir in sorted(Path(run_dir).glob("replicate-*/level-*/*")):
        path = vdir / "mask.safetensors"
        if not vdir.is_dir() or not path.exists():
            continue
        r = int(vdir.parent.parent.name.split("-")[1])
        lv = int(vdir.parent.name.split("-")[1])
        if level is not None and lv != level:
            continue
        # controls other than random-mask share the ticket's mask
        if vdir.name not in ("ticket", "dense", "random-mask"):
            continue
        out[f"{Path(run_dir).name}/r{r}/L{lv}/{vdir.name}"] = (
            Mask.load(path),
            r,
            lv,
            vdir.name,
            vdir,
        )
    return out


def compare_runs(run_dirs, out_dir=None, level: int | None = None) -> list[dict]:
    """Pairwise Jaccard and Hamming of all masks of the runs, per layer and overall.

    With ``out_dir``: ``compare.csv`` (pairs), ``signs.csv`` (sign agreement of each
    trained mask's kept weights with their initial values) and ``jaccard.png``.
    """
    from pathlib import Path

    from .runs import load_state, write_csv

    dirs = _check_runs(run_dirs)
    masks: dict[str, tuple] = {}
    for d in dirs:
        masks.update(run_masks(d, level))
    if not masks:
        raise UsageError("no masks found in the given runs")
    labels = list(masks)
    rows, matrix = [], [[1.0] * len(labels) for _ in labels]
    for i, a in enumerate(labels):
        for j in range(i + 1, len(labels)):
            b = labels[j]
            ma, mb = masks[a][0], masks[b][0]
            if sorted(ma.names()) != sorted(mb.names()):
                matrix[i][j] = matrix[j][i] = float("nan")
                continue
            jac = jaccard(ma, mb)
            matrix[i][j] = matrix[j][i] = jac
            rows.append(
                {"a": a, "b": b, "layer": "all", "jaccard": jac, "hamming": hamming(ma, mb)}
            )
            jl, hl = jaccard_per_layer(ma, mb), hamming_per_layer(ma, mb)
            for name in ma.names():
                rows.append(
                    {"a": a, "b": b, "layer": name, "jaccard": jl[name], "hamming": hl[name]}
                )
    if out_dir is not None:
        from .report import figures

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "compare.csv", rows, ["a", "b", "layer", "jaccard", "hamming"])
        signs = []
        for label, (mask, *_, vdir) in masks.items():
            start, end = vdir / "weights_start.safetensors", vdir / "weights_end.safetensors"
            if start.exists() and end.exists():
                agree = sign_agreement(load_state(end), load_state(start), mask)
                signs.append({"mask": label, "density": mask.density(), "sign_agreement": agree})
        write_csv(out / "signs.csv", signs, ["mask", "density", "sign_agreement"])
        figures.heatmap(matrix, labels, "Jaccard overlap of masks", out / "jaccard.png")
    return rows


def layer_reinit_runs(run_dirs, out_dir, level: int = 0, variant: str = "ticket", data_dir=None):
    """Layer re-initialisation robustness of replicate 0's trained network in each run."""
    from pathlib import Path

    from .data import load as load_data
    from .models import build
    from .protocols import random_reinit
    from .report import figures
    from .runs import load_state, read_json, write_csv

    dirs = _check_runs(run_dirs)
    jobs = []
    for d in dirs:
        vdir = d / "replicate-0" / f"level-{level}" / variant
        if not (vdir / "weights_end.safetensors").exists() or not (d / "spec.json").exists():
            raise UsageError(f"{d} has no trained {variant} at level {level} (looked in {vdir})")
        jobs.append((d, vdir, read_json(d / "spec.json")["spec"]))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    all_rows = []
    for d, vdir, s in jobs:
        data = load_data(
            s["dataset"],
            data_dir=data_dir or s.get("data_dir"),
            val_size=s.get("val_size"),
            split_seed=s["seed"],
            augment=s.get("augment"),
        )
        model = build(s["model"], data.input_shape, data.num_classes, s["width"], s["init"], 0)
        mask = Mask.load(vdir / "mask.safetensors")
        fresh = random_reinit(model, s["init"], derive_fresh_seed(s["seed"]))
        for k, m in mask.items():
            fresh[k] = fresh[k] * m
        rows = layer_reinit(
            model,
            load_state(vdir / "weights_end.safetensors"),
            load_state(vdir / "weights_start.safetensors"),
            fresh,
            data,
        )
        for r in rows:
            r["run"] = d.name
        all_rows += rows
        figures.layer_reinit_bars(
            rows, f"{d.name}: layer re-initialisation", out / f"layer-reinit-{d.name}.png"
        )
    write_csv(
        out / "layer_reinit.csv", all_rows, ["run", "layer", "reset", "test_accuracy", "test_loss"]
    )
    return all_rows


def derive_fresh_seed(seed: int) -> int:
    from .spec import derive_seed

    return derive_seed(seed, 0, "layer-reinit")


def double_descent_points(accuracy: list[float], spread: list[float] | None = None, tol=0.002):
    """The shape of a sparse double descent (He et al. 2022) in a test-accuracy curve
    ordered from dense to sparse: ``(first, peak, second)`` indices, where the test error
    has its first minimum (best accuracy before the dip), its peak between (the dip in
    accuracy) and its second minimum (the best accuracy after the dip, the "sweet spot");
    ``None`` when the curve has no dip. Of all dips, the deepest is taken; it counts when
    its depth (the smaller rise on either side) exceeds ``tol`` and the mean ``spread``
    (e.g. the std over replicates) at the three points."""
    n = len(accuracy)
    best = None
    for i in range(1, n - 1):
        j = max(range(i), key=lambda t: (accuracy[t], -t))
        k = max(range(i + 1, n), key=lambda t: (accuracy[t], -t))
        depth = min(accuracy[j] - accuracy[i], accuracy[k] - accuracy[i])
        if best is None or depth > best[0]:
            best = (depth, j, i, k)
    if best is None:
        return None
    depth, j, i, k = best
    noise = sum(spread[t] for t in (j, i, k)) / 3 if spread else 0.0
    return (j, i, k) if depth > max(tol, noise) else None
