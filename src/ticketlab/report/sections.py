"""The sections of a report: each reads runs, draws its figures and returns a
:class:`~ticketlab.report.html.Section`; and the run summaries they share."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..runs import read_csv, read_json
from . import figures
from .html import Section, Table

VARIANT_ORDER = {"dense": -1, "ticket": 0}


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict]
    columns: list[str]
    spec: dict

    @property
    def method(self) -> str:
        return self.rows[0].get("method", "") if self.rows else self.spec.get("method", "")


def load_runs(run_dirs) -> list[Run]:
    """Read every run first, so bad input fails before anything is written."""
    if not run_dirs:
        raise UsageError("give at least one run directory")
    runs = []
    for d in run_dirs:
        path = Path(d)
        csv_path = path / "results.csv"
        if not path.is_dir():
            raise UsageError(f"{d} is not a directory")
        if not csv_path.exists():
            raise UsageError(f"no results in {d} (no results.csv there)")
        rows = read_csv(csv_path)
        if not rows:
            raise UsageError(f"{csv_path} has no rows")
        needed = ("variant", "level", "density", "test_accuracy")
        if rows[0].get("method") == "wann":  # a topology search has no densities
            needed = ("variant", "generation", "mean_performance", "best_performance")
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise UsageError(f"{csv_path} lacks the columns {', '.join(missing)}")
        with open(csv_path) as f:
            columns = f.readline().strip().split(",")
        spec = read_json(path / "spec.json") if (path / "spec.json").exists() else {}
        runs.append(Run(path, path.name or str(path), rows, columns, spec))
    # runs of the same name are told apart by as much of their path as it takes
    for depth in range(1, 64):
        labels = [r.label for r in runs]
        same = [r for r in runs if labels.count(r.label) > 1]
        if not same:
            break
        for r in same:
            parts = r.path.resolve().parts
            r.label = "/".join(parts[-depth - 1 :]) if depth < len(parts) else str(r.path)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value)."""
    n = len(values)
    m = sum(values) / n
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return m, sd


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def summarize(run: Run, key: str = "variant") -> list[dict]:
    """Mean, std, min and max over replicates per (variant, level) of a run.

    Rows of a stability run are grouped by rewind step as well.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in run.rows:
        if r.get("status", "done") not in ("done", ""):
            continue
        extra = r.get("rewind_step", "")
        groups.setdefault((r[key], int(r["level"]), extra), []).append(r)
    out = []
    for (variant, level, extra), rs in groups.items():
        acc = [_num(r["test_accuracy"]) for r in rs]
        stop = [_num(r.get("best_val_step")) for r in rs]
        m, sd = mean_std(acc)
        sm, ssd = mean_std(stop)
        out.append(
            {
                "variant": variant,
                "level": level,
                "rewind_step": extra,
                "density": sum(_num(r["density"]) for r in rs) / len(rs),
                "n": len(rs),
                "acc_mean": m,
                "acc_std": sd,
                "acc_min": min(acc),
                "acc_max": max(acc),
                "stop_mean": sm,
                "stop_std": ssd,
            }
        )
    out.sort(key=lambda s: (VARIANT_ORDER.get(s["variant"], 1), s["variant"], s["level"]))
    return out


def dense_reference(summary: list[dict]) -> dict | None:
    """The dense network's summary: level 0 of the ticket (or ``dense``) variant."""
    for s in summary:
        if s["level"] == 0 and s["variant"] in ("ticket", "dense"):
            return s
    return None


def matching_threshold(summary: list[dict]) -> float | None:
    ref = dense_reference(summary)
    return None if ref is None else ref["acc_mean"] - ref["acc_std"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def _pct(v: float, digits: int = 2) -> str:
    return "" if math.isnan(v) else f"{100 * v:.{digits}f}"


def layer_levels(run: Run) -> tuple[list[dict], list[str]]:
    """Per-layer densities of replicate 0 at each level, read from its masks."""
    from ..masks import Mask

    rdir = run.path / "replicate-0"
    levels = sorted({int(r["level"]) for r in run.rows})
    out, names = [], []
    for level in levels:
        ldir = rdir / f"level-{level}"
        candidates = [ldir / "mask.safetensors", ldir / "ticket" / "mask.safetensors"]
        path = next((p for p in candidates if p.exists()), None)
        if path is None:
            continue
        mask = Mask.load(path)
        names = names or mask.names()
        out.append({"level": level, "density": mask.density(), "layers": mask.layer_density()})
    return out, names


def _series(summary: list[dict], label: str, y: str, names=None) -> list[dict]:
    """One line per variant (and rewind step) of ``summary``; ``names(variant)`` names it
    (default: ``label`` and the variant)."""
    out = []
    variants = []
    for s in summary:
        key = (s["variant"], s["rewind_step"])
        if key not in variants:
            variants.append(key)
    for variant, extra in variants:
        ss = sorted(
            (s for s in summary if s["variant"] == variant and s["rewind_step"] == extra),
            key=lambda s: -s["density"],
        )
        name = names(variant) if names else f"{label} {variant}"
        name += f" k={extra}" if extra != "" else ""
        out.append(
            {
                "label": name,
                "density": [s["density"] for s in ss],
                "mean": [100 * s[f"{y}_mean"] if y == "acc" else s[f"{y}_mean"] for s in ss],
                "std": [100 * s[f"{y}_std"] if y == "acc" else s[f"{y}_std"] for s in ss],
                "ls": "-" if variant in ("ticket", "dense") else "--",
            }
        )
    return out


TARGET_FIELDS = ("density", "sparsity")


def curve_groups(runs) -> list[tuple[list[Run], list[tuple[str, str]]]]:
    """Runs that differ only in their target density, grouped to be drawn as one curve.

    A ``prune``, ``dst`` or ``gradual`` run trains at one density, so a sweep over
    densities is several runs; joined, each criterion reads as a line against
    density, as an IMP run does. Each group comes with the spec fields (name,
    value) that tell it from the other groups. Groups keep the order of their
    first run; runs without a density in their spec stay alone.
    """
    keyed: dict[str, list[Run]] = {}
    for i, r in enumerate(runs):
        ident = r.spec.get("identity") or {}
        if "density" in ident:
            rest = {k: v for k, v in ident.items() if k not in TARGET_FIELDS}
            key = json.dumps(rest, sort_keys=True, default=str)
        else:
            key = f"alone-{i}"
        keyed.setdefault(key, []).append(r)
    groups = list(keyed.values())

    def value(r: Run, k: str) -> str:  # the resolved value, also where it is a default
        return str((r.spec.get("spec") or {}).get(k, (r.spec.get("identity") or {}).get(k)))

    joined = [g for g in groups if len(g) > 1]
    names = sorted({k for g in joined for k in g[0].spec["identity"] if k not in TARGET_FIELDS})
    differing = [k for k in names if len({value(g[0], k) for g in joined}) > 1]
    return [(g, [(k, value(g[0], k)) for k in differing]) for g in groups]


def density_lines(runs, summaries, y: str) -> list[dict]:
    """Lines for the density figures: a run's own, or a group's joined over its runs."""
    series = []
    for group, tells in curve_groups(runs):
        if len(group) == 1:
            series += _series(summaries[group[0].label], group[0].label, y)
            continue
        merged, seen = [], set()
        for r in group:  # the dense level of each run is the same network: draw it once
            for s in summaries[r.label]:
                key = (s["variant"], s["rewind_step"], round(s["density"], 6))
                if key not in seen:
                    seen.add(key)
                    merged.append(s)
        method = group[0].method

        def names(variant, tells=tells, method=method):
            parts = [f"{k}={v}" for k, v in tells if v != variant]
            return f"{method} {variant}" + (f" ({', '.join(parts)})" if parts else "")

        series += _series(merged, "", y, names)
    return series


def accuracy_section(runs, summaries, out: Path) -> Section:
    series = density_lines(runs, summaries, "acc")
    png = figures.metric_vs_density(
        series, "test accuracy %", "Test accuracy at the end of training", out / "accuracy.png"
    )
    section = Section(
        "Test accuracy against density",
        figures=[(png, f"Test accuracy (mean, {figures.BAND_NOTE}) against weights remaining.")],
    )
    cols = ["run", "variant", "level", "rewind step", "weights %", "n", "test acc % mean"]
    cols += ["std", "min", "max", "matching"]
    for r in runs:
        thr = matching_threshold(summaries[r.label])
        rows = []
        for s in summaries[r.label]:
            match = "" if thr is None else ("matching" if s["acc_mean"] >= thr else "")
            rows.append(
                [
                    r.label,
                    s["variant"],
                    str(s["level"]),
                    s["rewind_step"],
                    _pct(s["density"], 1),
                    str(s["n"]),
                    _pct(s["acc_mean"]),
                    _pct(s["acc_std"]),
                    _pct(s["acc_min"]),
                    _pct(s["acc_max"]),
                    match,
                ]
            )
        thr_text = "no dense level" if thr is None else f"threshold {_pct(thr)}%"
        section.tables.append(
            Table(
                f"{r.label}: test accuracy over replicates ({thr_text})",
                cols,
                rows,
                str(r.path / "results.csv"),
            )
        )
    return section


def _curves(run: Run, key) -> tuple[list[dict], list[tuple]]:
    """Lines of test accuracy (mean ± std over replicates) from the rows of ``run``:
    ``key(row)`` gives each row's (line name, x). Returns the series for
    :func:`figures.metric_vs_x` and one ``(line, x, rows, mean, std)`` per point."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in run.rows:
        groups.setdefault(key(row), []).append(row)
    series, points = [], []
    for line in dict.fromkeys(name for name, _ in groups):
        xs = sorted(x for name, x in groups if name == line)
        stats = [mean_std([float(r["test_accuracy"]) for r in groups[(line, x)]]) for x in xs]
        series.append(
            {
                "label": f"{run.label} {line}",
                "x": xs,
                "mean": [100 * m for m, _ in stats],
                "std": [100 * sd for _, sd in stats],
            }
        )
        points += [(line, x, groups[(line, x)], m, sd) for x, (m, sd) in zip(xs, stats)]
    return series, points


def noise_section(runs, out: Path) -> Section:
    """Accuracy against input-noise scale, one line per run and variant (network)."""
    series, tables = [], []
    for r in runs:
        lines, points = _curves(r, lambda row: (row["variant"], float(row["noise"])))
        series += lines
        rows = [[v, f"{x:g}", str(len(rs)), _pct(m), _pct(sd)] for v, x, rs, m, sd in points]
        cols = ["network", "noise level", "n", "test acc % mean", "std"]
        tables.append(
            Table(f"{r.label}: accuracy under noise", cols, rows, str(r.path / "results.csv"))
        )
    kinds = {row.get("noise_kind") or "gaussian" for r in runs for row in r.rows}
    axis = (
        "scale of the Gaussian noise added to test inputs"
        if kinds == {"gaussian"}
        else "fraction of test-input pixels set to a bright value"
        if kinds == {"pixels"}
        else "noise level (fraction of pixels, or Gaussian scale)"
    )
    png = figures.metric_vs_x(
        series,
        axis,
        "test accuracy %",
        "Noise robustness",
        out / "noise.png",
    )
    return Section(
        "Noise robustness",
        figures=[(png, f"Test accuracy under input noise (mean, {figures.BAND_NOTE}).")],
        tables=tables,
    )


def continual_section(runs, out: Path) -> Section:
    """SupSup: each task's accuracy as later tasks are learned, and with the id inferred."""

    def key(row):
        inferred = row["variant"] == "task-inferred"
        return ("id inferred" if inferred else f"task {row['eval_task']}", int(row["level"]) + 1)

    series, tables = [], []
    for r in runs:
        lines, points = _curves(r, key)
        series += lines
        rows = []
        for task, x, rs, m, sd in points:
            found = [float(f) for f in (q.get("inference_accuracy") for q in rs) if f]
            found_pct = _pct(sum(found) / len(found)) if found else ""
            rows.append([task, str(x), str(len(rs)), _pct(m), _pct(sd), found_pct])
        cols = ["evaluated on", "tasks learned", "n", "test acc % mean", "std", "id found %"]
        tables.append(
            Table(f"{r.label}: accuracy per task", cols, rows, str(r.path / "results.csv"))
        )
    png = figures.metric_vs_x(
        series,
        "tasks learned",
        "test accuracy %",
        "Accuracy as tasks are added",
        out / "tasks.png",
        integer_x=True,
    )
    return Section(
        "Continual learning",
        figures=[
            (png, f"Accuracy per task and with the task inferred (mean, {figures.BAND_NOTE}).")
        ],
        tables=tables,
    )


def early_stop_section(runs, summaries, out: Path) -> Section:
    series = density_lines(runs, summaries, "stop")
    png = figures.metric_vs_density(
        series,
        "early-stop step (min. validation loss)",
        "Early-stop step",
        out / "early_stop.png",
    )
    section = Section(
        "Early-stop step against density",
        figures=[(png, f"Step of minimum validation loss (mean, {figures.BAND_NOTE}).")],
    )
    cols = ["run", "variant", "level", "rewind step", "weights %", "n", "early stop mean", "std"]
    for r in runs:
        rows = [
            [
                r.label,
                s["variant"],
                str(s["level"]),
                s["rewind_step"],
                _pct(s["density"], 1),
                str(s["n"]),
                f"{s['stop_mean']:.1f}",
                f"{s['stop_std']:.1f}",
            ]
            for s in summaries[r.label]
        ]
        section.tables.append(
            Table(f"{r.label}: early-stop step", cols, rows, str(r.path / "results.csv"))
        )
    return section


def layer_section(runs, out: Path) -> Section | None:
    section = Section(
        "Per-layer density",
        text="Kept fraction of each layer's weights at each level (replicate 0's masks).",
    )
    for r in runs:
        levels, names = layer_levels(r)
        if not levels:
            continue
        png = figures.layer_density(
            levels, names, f"{r.label}: per-layer density", out / f"layers-{_slug(r.label)}.png"
        )
        section.figures.append((png, f"{r.label}: percent of each layer's weights remaining."))
        rows = [
            [str(lv["level"]), _pct(lv["density"], 1)] + [_pct(lv["layers"][n]) for n in names]
            for lv in levels
        ]
        section.tables.append(
            Table(
                f"{r.label}: percent of weights remaining per layer",
                ["level", "all"] + names,
                rows,
                str(r.path / "replicate-0"),
            )
        )
    return section if section.figures else None


def stability_section(runs, out: Path) -> Section:
    section = Section(
        "Stability (linear mode connectivity)",
        text="Instability: maximum test error along the linear path between two copies trained"
        " with different data orders, minus the mean of the endpoints' errors (Frankle et al."
        " 2020). BatchNorm statistics are recomputed at every point (bn batches).",
    )
    series = []
    for r in runs:
        groups: dict[tuple, list[dict]] = {}
        for row in r.rows:
            groups.setdefault((int(row["level"]), int(row["rewind_step"])), []).append(row)
        by_level: dict[int, list] = {}
        table_rows = []
        for (level, k), rs in sorted(groups.items()):
            m, sd = mean_std([_num(x["instability"]) for x in rs])
            by_level.setdefault(level, []).append((k, m, sd, _num(rs[0]["density"])))
            table_rows.append(
                [
                    r.label,
                    str(level),
                    _pct(_num(rs[0]["density"]), 1),
                    str(k),
                    str(len(rs)),
                    _pct(m),
                    _pct(sd),
                    rs[0].get("bn_batches", ""),
                ]
            )
        for level, pts in sorted(by_level.items()):
            series.append(
                {
                    "label": f"{r.label} level {level} ({_pct(pts[0][3], 1)}%)",
                    "k": [p[0] for p in pts],
                    "mean": [p[1] for p in pts],
                    "std": [p[2] for p in pts],
                }
            )
        section.tables.append(
            Table(
                f"{r.label}: instability (error percentage points)",
                [
                    "run",
                    "level",
                    "weights %",
                    "rewind step",
                    "n",
                    "instability mean",
                    "std",
                    "bn batches",
                ],
                table_rows,
                str(r.path / "results.csv"),
            )
        )
        path_csv = r.path / "paths.csv"
        if path_csv.exists():
            prow = read_csv(path_csv)
            paths: dict[tuple, dict] = {}
            for p in prow:
                if p["replicate"] != "0":
                    continue
                key = (p["level"], p["rewind_step"])
                d = paths.setdefault(
                    key, {"label": f"level {key[0]}, k={key[1]}", "alpha": [], "error": []}
                )
                d["alpha"].append(_num(p["alpha"]))
                d["error"].append(_num(p["test_error"]))
            png = figures.error_paths(
                list(paths.values()),
                f"{r.label}: test error along the path (replicate 0)",
                out / f"paths-{_slug(r.label)}.png",
            )
            section.figures.append((png, f"{r.label}: test error along the linear path."))
    png = figures.instability_vs_rewind(series, "Instability", out / "instability.png")
    section.figures.insert(0, (png, f"Instability against rewind step ({figures.BAND_NOTE})."))
    return section


def sweep_section(runs, points: list[dict], out: Path) -> Section:
    """A sweep read as a paper's table: a row per swept setting and variant, a column per
    value of the swept target (or of the last swept flag), each cell the mean ± std over
    seeds and replicates of the deepest level's test accuracy; the same as lines against
    weights remaining."""
    keys = list(dict.fromkeys(k for p in points for k in p))
    column = next((k for k in ("sparsity", "density") if k in keys), keys[-1] if keys else "")
    cells: dict[tuple, dict] = {}
    for run, point in zip(runs, points):
        done = [r for r in run.rows if r.get("status", "done") in ("done", "")]
        if not done:
            continue
        level = max(int(r["level"]) for r in done)
        group = ", ".join(f"{k}={v}" for k, v in point.items() if k not in (column, "seed"))
        for r in done:
            if int(r["level"]) != level:
                continue
            cell = cells.setdefault((group, r["variant"], str(point.get(column, ""))), {})
            cell.setdefault("acc", []).append(_num(r["test_accuracy"]))
            cell.setdefault("density", []).append(_num(r["density"]))
    values = list(dict.fromkeys(str(p.get(column, "")) for p in points))
    lines = list(dict.fromkeys((g, v) for g, v, _ in cells))
    rows, series = [], []
    for group, variant in lines:
        row = [group or "(all)", variant]
        pts = []
        for val in values:
            c = cells.get((group, variant, val))
            if c is None:
                row.append("")
                continue
            m, sd = mean_std(c["acc"])
            row.append(f"{_pct(m)} ± {_pct(sd)} (n={len(c['acc'])})")
            pts.append((sum(c["density"]) / len(c["density"]), 100 * m, 100 * sd))
        rows.append(row)
        pts.sort(key=lambda t: -t[0])
        name = f"{variant}" + (f" ({group})" if group and group != variant else "")
        series.append(
            {
                "label": name,
                "density": [p[0] for p in pts],
                "mean": [p[1] for p in pts],
                "std": [p[2] for p in pts],
            }
        )
    png = figures.metric_vs_density(
        series, "test accuracy %", "Test accuracy over the sweep", out / "sweep.png"
    )
    section = Section(
        "Sweep",
        text=f"One line per setting and variant over {column or 'the sweep'}; "
        "cells are the mean ± std over seeds and replicates of the deepest level's "
        "test accuracy.",
        figures=[(png, f"Test accuracy (mean, {figures.BAND_NOTE}) against weights remaining.")],
    )
    section.tables.append(
        Table(f"test accuracy % by {column}", ["setting", "variant", *values], rows)
    )
    return section


def diverged_section(runs) -> Section | None:
    """The phases whose training loss became non-finite: left out of every mean and figure."""
    cols = ["run", "replicate", "level", "variant", "diverged at step", "last finite test acc"]
    rows = [
        [
            str(r.path),
            *(str(row.get(k, "")) for k in ("replicate", "level", "variant")),
            str(row.get("diverged_step", "")),
            str(row.get("test_accuracy", "")),
        ]
        for r in runs
        for row in r.rows
        if row.get("status") == "diverged"
    ]
    if not rows:
        return None
    section = Section(
        "Diverged",
        text="These phases stopped when their training loss became non-finite; they are left "
        "out of every mean and figure above, and their replicates' later levels were not run.",
    )
    section.tables.append(Table("diverged phases", cols, rows))
    return section


def raw_section(runs) -> Section:
    section = Section("results.csv", text="Every row of each run's results.csv, as stored.")
    for r in runs:
        section.raw_tables.append(
            Table(
                f"{r.path / 'results.csv'}",
                r.columns,
                [[row.get(c, "") for c in r.columns] for row in r.rows],
                str(r.path / "results.csv"),
            )
        )
    return section
