"""Interpretable units of pruned networks (after Frankle & Bau 2019, "Dissecting Pruned
Neural Networks"), with the concepts this project has in place of Broden.

Two kinds of concept detector, each by its paper's definition:

- **Class detectors** (Morcos et al. 2018). A unit's class selectivity index is
  ``(mu_max - mu_-max) / (mu_max + mu_-max)``, with ``mu_max`` its largest
  class-conditional mean activation and ``mu_-max`` the mean of its class-conditional
  means over the other classes (a conv unit's activation is its feature map's mean).
  Activations are taken after the ReLU, so the index lies in [0, 1]; a unit that never
  fires has index 0. A unit is a class detector when its index is at least a threshold.
- **Spatial concept detectors** for conv units (network dissection, Bau et al. 2017).
  The unit's threshold ``T_k`` is the top-``quantile`` (0.5%) value of its activations
  over every position of every image; its map is upsampled bilinearly to the image size
  and ``M_k(x) = S_k(x) >= T_k`` (where it fires: ``S_k(x) > 0``); its IoU with a concept ``c`` is
  ``sum_x |M_k(x) & L_c(x)| / sum_x |M_k(x) | L_c(x)|``. A unit detects its best
  concept when that IoU is at least ``iou_threshold`` (0.04, as Bau et al. and Frankle &
  Bau use).

The concepts derived from the images (:func:`derived_concepts`): ``object`` (pixels
brighter than a threshold in the raw intensity), ``background`` (the rest) and the
``upper``, ``lower``, ``left`` and ``right`` halves. Note that a mask covering a fraction
``a`` of the image bounds the IoU by about ``quantile / a``, so with the 0.5% quantile a
half-image concept cannot reach 0.04: either use a larger ``quantile`` for such concepts
or small concepts (a folder of them, :func:`folder_concepts`).

A unit is *interpretable* when it is a class or a concept detector; a layer's
*concepts* are the distinct labels (classes and spatial concepts) its units detect,
each unit labelled by its best class and its best concept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError

UNIT_COLUMNS = [
    "replicate",
    "level",
    "variant",
    "density",
    "layer",
    "unit",
    "selectivity",
    "top_class",
    "class_detector",
    "top_concept",
    "iou",
    "concept_detector",
    "interpretable",
]
LAYER_COLUMNS = [
    "replicate",
    "level",
    "variant",
    "density",
    "test_accuracy",
    "layer",
    "units",
    "class_detectors",
    "concept_detectors",
    "interpretable",
    "concepts",
    "labels",
]
DERIVED = ("object", "background", "upper", "lower", "left", "right")


@dataclass
class ConceptSet:
    """Images (normalised as the model's inputs) and one boolean mask per concept of
    the same height and width, ``(N, H, W)``."""

    images: torch.Tensor
    masks: dict[str, torch.Tensor]
    source: str = "derived"


# definitions -------------------------------------------------------------------


def class_selectivity(act: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Morcos et al.'s class selectivity index per unit of ``act`` (N, units) of
    non-negative activations: ``(mu_max - mu_-max) / (mu_max + mu_-max)``; 0 where the
    unit is silent. Classes with no example are left out."""
    act = act.double()
    present = [c for c in range(num_classes) if bool((labels == c).any())]
    if len(present) < 2:
        raise UsageError("class selectivity needs examples of at least two classes")
    mu = torch.stack([act[labels == c].mean(0) for c in present])  # (classes, units)
    top, _ = mu.max(0)
    rest = (mu.sum(0) - top) / (len(present) - 1)
    denom = top + rest
    si = torch.where(denom > 0, (top - rest) / denom.clamp_min(1e-300), torch.zeros_like(top))
    return si


def top_class(act: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The class of each unit's largest class-conditional mean activation."""
    mu = torch.stack(
        [
            act[labels == c].double().mean(0)
            if bool((labels == c).any())
            else torch.full(act.shape[1:], -math.inf, dtype=torch.float64)
            for c in range(num_classes)
        ]
    )
    return mu.argmax(0)


def unit_thresholds(maps: torch.Tensor, quantile: float = 0.005) -> torch.Tensor:
    """``T_k`` per unit of ``maps`` (N, C, h, w): the smallest of the top fraction
    ``quantile`` of the unit's activations over all images and positions."""
    if not 0 < quantile < 1:
        raise UsageError(f"quantile must be in (0, 1); got {quantile}")
    flat = maps.transpose(0, 1).reshape(maps.shape[1], -1)
    m = flat.shape[1]
    top = max(int(quantile * m), 1)  # the top `top` values are >= T_k
    return flat.kthvalue(m - top + 1, dim=1).values


def unit_iou(
    maps: torch.Tensor,
    masks: dict[str, torch.Tensor],
    thresholds: torch.Tensor,
    batch: int = 64,
) -> torch.Tensor:
    """IoU (units, concepts) of each unit's thresholded, upsampled activation map with
    each concept's masks, summed over the data set as network dissection does."""
    names = list(masks)
    size = next(iter(masks.values())).shape[1:]
    n, c = maps.shape[:2]
    inter = torch.zeros(c, len(names), dtype=torch.float64)
    fired = torch.zeros(c, dtype=torch.float64)
    concept = torch.stack([masks[k] for k in names], 1).float()  # (N, K, H, W)
    area = concept.double().sum((0, 2, 3))
    for i in range(0, n, batch):
        up = F.interpolate(maps[i : i + batch].float(), size=size, mode="bilinear",
                           align_corners=False)  # fmt: skip
        # at or above T_k, and firing: a unit silent on most positions (T_k = 0) is not
        # taken to cover the whole image
        on = ((up >= thresholds.view(1, -1, 1, 1)) & (up > 0)).float().flatten(2)  # (B, C, P)
        lab = concept[i : i + batch].flatten(2)  # (B, K, P)
        inter += torch.einsum("bcp,bkp->ck", on, lab).double()
        fired += on.sum((0, 2)).double()
    union = fired[:, None] + area[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


# concepts --------------------------------------------------------------------------


def derived_concepts(
    x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, object_threshold: float = 0.2
) -> dict[str, torch.Tensor]:
    """The concepts of images ``x`` (N, C, H, W), normalised with ``mean``/``std``:
    object (raw intensity, the channels' mean, above ``object_threshold``), background,
    and the upper, lower, left and right halves."""
    raw = x * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)
    intensity = raw.mean(1)
    obj = intensity > object_threshold
    n, h, w = intensity.shape
    rows = torch.arange(h).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(w).view(1, 1, w).expand(n, h, w)
    return {
        "object": obj,
        "background": ~obj,
        "upper": rows < h // 2,
        "lower": rows >= h - h // 2,
        "left": cols < w // 2,
        "right": cols >= w - w // 2,
    }


def _read_image(path: Path) -> np.ndarray:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False)
    import matplotlib.image

    return matplotlib.image.imread(str(path))


def folder_concepts(folder, input_shape: tuple, mean: torch.Tensor, std: torch.Tensor):
    """A concept set from a folder::

        FOLDER/images/<id>.png|.npy            an image, values in [0, 1]: (H, W),
                                               (H, W, C) or, for .npy, (C, H, W)
        FOLDER/masks/<concept>/<id>.png|.npy   where <concept> is in image <id>
                                               (nonzero: present; (H, W) or (H, W, C))

    An image without a mask for a concept does not contain it. Images must have the
    model's input shape; they are normalised with the run's training statistics.
    """
    folder = Path(folder)
    files = sorted(p for p in (folder / "images").glob("*") if p.suffix in (".png", ".npy"))
    if not files:
        raise UsageError(f"no images in {folder / 'images'} (.png or .npy files)")
    c, h, w = input_shape
    images = []
    for p in files:
        a = np.asarray(_read_image(p), dtype=np.float32)
        if a.ndim == 2:
            a = a[None]
        elif a.ndim == 3 and (p.suffix == ".png" or a.shape[0] not in (1, 3)):
            a = a[..., :3].transpose(2, 0, 1)  # (H, W, C), an alpha channel dropped
        if a.shape[0] != c:
            a = a.mean(0, keepdims=True) if c == 1 else np.repeat(a[:1], c, 0)
        if a.shape != (c, h, w):
            raise UsageError(f"{p}: shape {a.shape} does not match the model's input {input_shape}")
        images.append(torch.from_numpy(np.ascontiguousarray(a)))
    x = torch.stack(images)
    x = (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    masks = {}
    for cdir in sorted(p for p in (folder / "masks").glob("*") if p.is_dir()):
        m = torch.zeros(len(files), h, w, dtype=torch.bool)
        for i, p in enumerate(files):
            for suffix in (".png", ".npy"):
                q = cdir / (p.stem + suffix)
                if q.exists():
                    a = np.asarray(_read_image(q))
                    a = a if a.ndim == 2 else a[..., 0] if a.shape[-1] in (1, 3, 4) else a[0]
                    if a.shape != (h, w):
                        raise UsageError(f"{q}: mask shape {a.shape}, image {(h, w)}")
                    m[i] = torch.from_numpy(np.ascontiguousarray(a != 0))
        masks[cdir.name] = m
    if not masks:
        raise UsageError(f"no concept folders in {folder / 'masks'}")
    return ConceptSet(x, masks, source=str(folder))


# a network --------------------------------------------------------------------------


def unit_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers whose units are dissected: every Conv2d and Linear but the output
    layer, each read where its ReLU reads it (at its BatchNorm when one follows it)."""
    output = getattr(model, "output_layer_name", None)
    out = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for i, (name, mod) in enumerate(children):
            full = f"{parent_name}.{name}" if parent_name else name
            if not isinstance(mod, (nn.Conv2d, nn.Linear)) or full == output:
                continue
            nxt = children[i + 1][1] if i + 1 < len(children) else None
            tap = nxt if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)) else mod
            out.append((full, tap))
    return out


@torch.no_grad()
def activations(model: nn.Module, x: torch.Tensor, batch: int = 250) -> dict[str, torch.Tensor]:
    """Each dissected layer's activations after ReLU on ``x``: (N, units) or (N, C, h, w)."""
    was = model.training
    model.eval()
    taps = unit_layers(model)
    got: dict[str, list] = {name: [] for name, _ in taps}
    hooks = [
        tap.register_forward_hook(lambda m, i, o, name=name: got[name].append(o.relu()))
        for name, tap in taps
    ]
    try:
        for i in range(0, len(x), batch):
            model(x[i : i + batch])
    finally:
        for h in hooks:
            h.remove()
        model.train(was)
    return {k: torch.cat(v) for k, v in got.items()}


def dissect(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    concepts: ConceptSet | None,
    *,
    selectivity_threshold: float = 0.5,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
) -> list[dict]:
    """One row per unit of every dissected layer: class selectivity on (``x``, ``y``),
    and for conv units the best concept of ``concepts`` with its IoU."""
    acts = activations(model, x)
    spatial = activations(model, concepts.images) if concepts is not None else {}
    names = list(concepts.masks) if concepts is not None else []
    rows = []
    for layer, a in acts.items():
        pooled = a.flatten(2).mean(2) if a.dim() == 4 else a
        si = class_selectivity(pooled, y, num_classes)
        best = top_class(pooled, y, num_classes)
        iou = None
        if a.dim() == 4 and names:
            maps = spatial[layer]
            iou = unit_iou(maps, concepts.masks, unit_thresholds(maps, quantile))
        for u in range(pooled.shape[1]):
            row = {
                "layer": layer,
                "unit": u,
                "selectivity": float(si[u]),
                "top_class": int(best[u]),
                "class_detector": bool(si[u] >= selectivity_threshold),
                "top_concept": "",
                "iou": "",
                "concept_detector": False,
            }
            if iou is not None:
                k = int(iou[u].argmax())
                row.update(top_concept=names[k], iou=float(iou[u, k]))
                row["concept_detector"] = bool(iou[u, k] >= iou_threshold)
            row["interpretable"] = row["class_detector"] or row["concept_detector"]
            rows.append(row)
    return rows


def layer_summary(units: list[dict]) -> list[dict]:
    """Per layer: units, class and concept detectors, interpretable units, and the
    distinct labels they detect (``class:<c>`` and concept names)."""
    out: dict[str, dict] = {}
    for u in units:
        s = out.setdefault(
            u["layer"],
            {
                "layer": u["layer"],
                "units": 0,
                "class_detectors": 0,
                "concept_detectors": 0,
                "interpretable": 0,
                "labels": set(),
            },
        )
        s["units"] += 1
        s["class_detectors"] += u["class_detector"]
        s["concept_detectors"] += u["concept_detector"]
        s["interpretable"] += u["interpretable"]
        if u["class_detector"]:
            s["labels"].add(f"class:{u['top_class']}")
        if u["concept_detector"]:
            s["labels"].add(u["top_concept"])
    rows = []
    for s in out.values():
        labels = sorted(s.pop("labels"))
        rows.append({**s, "concepts": len(labels), "labels": " ".join(labels)})
    return rows


# run directories -----------------------------------------------------------------------


def dissect_runs(
    run_dirs,
    examples: int = 1000,
    concepts_dir=None,
    selectivity_threshold: float = 0.5,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    object_threshold: float = 0.2,
    variants: tuple[str, ...] = ("ticket", "dense"),
    seed: int = 0,
    data_dir: str | None = None,
) -> dict[Path, list[dict]]:
    """Dissect the trained network of every level (``variants``, every replicate) of each
    run on ``examples`` test images (drawn by ``seed``); writes ``<run>/dissect.csv`` (a
    row per level and layer) and ``<run>/dissect_units.csv`` (a row per unit)."""
    from .data import load as load_data
    from .masks import Mask
    from .models import build
    from .runs import load_state, read_json, write_csv

    for name, v, lo, hi in (
        ("selectivity threshold", selectivity_threshold, 0, 1),
        ("iou threshold", iou_threshold, 0, 1),
    ):
        if not lo <= v <= hi:
            raise UsageError(f"{name} must be in [{lo}, {hi}]; got {v}")
    if not 0 < quantile < 1:
        raise UsageError(f"quantile must be in (0, 1); got {quantile}")
    if examples < 2:
        raise UsageError(f"examples must be >= 2; got {examples}")
    jobs = []
    for d in run_dirs:
        d = Path(d)
        if not (d / "spec.json").exists() or not (d / "results.csv").exists():
            raise UsageError(f"{d} is not a finished run directory (no spec.json/results.csv)")
        phases = []
        for vdir in sorted(d.glob("replicate-*/level-*/*")):
            if vdir.name in variants and (vdir / "weights_end.safetensors").exists():
                r = int(vdir.parent.parent.name.removeprefix("replicate-"))
                phases.append((r, int(vdir.parent.name.removeprefix("level-")), vdir))
        if not phases:
            raise UsageError(f"{d} has no trained network of variant {', '.join(variants)}")
        jobs.append((d, read_json(d / "spec.json")["spec"], sorted(phases)))
    out = {}
    for d, s, phases in jobs:
        data = load_data(
            s["dataset"],
            data_dir=data_dir or s.get("data_dir"),
            val_size=s.get("val_size"),
            split_seed=s["seed"],
            augment=False,
        )
        if concepts_dir is not None and len(data.input_shape) != 3:
            raise UsageError("a concept folder needs a run on images (C, H, W)")
        n = min(examples, len(data.y_test))
        pick = torch.randperm(len(data.y_test), generator=torch.Generator().manual_seed(seed))
        idx = pick[:n].sort().values
        x, y = data.x_test[idx], data.y_test[idx]
        if len(data.input_shape) != 3:
            concepts = None
        elif concepts_dir is not None:
            concepts = folder_concepts(concepts_dir, data.input_shape, data.mean, data.std)
        else:
            concepts = ConceptSet(x, derived_concepts(x, data.mean, data.std, object_threshold))
        model = build(s["model"], data.input_shape, data.num_classes, s["width"], s["init"], 0)
        accuracy = {}
        from .runs import read_csv

        for row in read_csv(d / "results.csv"):
            accuracy[(row["replicate"], row["level"], row["variant"])] = row["test_accuracy"]
        unit_rows, layer_rows = [], []
        for r, level, vdir in phases:
            model.load_state_dict(load_state(vdir / "weights_end.safetensors"))
            mask_path = vdir / "mask.safetensors"
            density = Mask.load(mask_path).density() if mask_path.exists() else 1.0
            key = {"replicate": r, "level": level, "variant": vdir.name, "density": density}
            units = dissect(
                model,
                x,
                y,
                data.num_classes,
                concepts,
                selectivity_threshold=selectivity_threshold,
                quantile=quantile,
                iou_threshold=iou_threshold,
            )
            unit_rows += [{**key, **u} for u in units]
            acc = accuracy.get((str(r), str(level), vdir.name), "")
            layer_rows += [{**key, "test_accuracy": acc, **s_} for s_ in layer_summary(units)]
        write_csv(d / "dissect_units.csv", unit_rows, UNIT_COLUMNS)
        write_csv(d / "dissect.csv", layer_rows, LAYER_COLUMNS)
        out[d] = layer_rows
    return out


__all__ = [
    "ConceptSet",
    "activations",
    "class_selectivity",
    "derived_concepts",
    "dissect",
    "dissect_runs",
    "folder_concepts",
    "layer_summary",
    "unit_iou",
    "unit_layers",
    "unit_thresholds",
]
