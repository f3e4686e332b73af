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
from .table import headline

VARIANT_ORDER = {"dense": -1, "ticket": 0}


@dataclass
class Run:
    path: Path
    label: str
    rows: list[dict]
    columns: list[str]
    spec: dict
    # what the density figures and tables show: test accuracy, or the metric a custom
    # objective selects by (``test_<metric>``)
    metric: str = "accuracy"

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
        metric = headline(rows)  # accuracy, unless a custom objective selects by another
        needed = ("variant", "level", "density", f"test_{metric}")
        if rows[0].get("method") == "wann":  # a topology search has no densities
            needed = ("variant", "generation", "mean_performance", "best_performance")
        missing = [c for c in needed if c not in rows[0]]
        if missing:
            raise UsageError(f"{csv_path} lacks the columns {', '.join(missing)}")
        with open(csv_path) as f:
            columns = f.readline().strip().split(",")
        spec = read_json(path / "spec.json") if (path / "spec.json").exists() else {}
        runs.append(Run(path, path.name or str(path), rows, columns, spec, metric))
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
        acc = [_num(r[f"test_{run.metric}"]) for r in rs]
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
                # the same values unscaled, for a metric that is not a fraction
                "raw_mean": m,
                "raw_std": sd,
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
    metrics = {r.metric for r in runs}
    if metrics != {"accuracy"}:  # a custom objective's metric, drawn and listed as it is
        return _metric_section(runs, summaries, out, metrics)
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


def _metric_section(runs, summaries, out: Path, metrics: set[str]) -> Section:
    """The density figure and tables for runs whose objective reports another metric than
    accuracy (a regression's MSE, say): the values as they are, no matching column."""
    name = metrics.pop() if len(metrics) == 1 else "metric"
    series = density_lines(runs, summaries, "raw")
    png = figures.metric_vs_density(
        series, f"test {name}", f"Test {name} at the end of training", out / "accuracy.png"
    )
    section = Section(
        f"Test {name} against density",
        figures=[(png, f"Test {name} (mean, {figures.BAND_NOTE}) against weights remaining.")],
    )
    cols = ["run", "variant", "level", "rewind step", "weights %", "n", f"test {name} mean"]
    cols += ["std", "min", "max"]
    for r in runs:
        rows = [
            [r.label, s["variant"], str(s["level"]), s["rewind_step"], _pct(s["density"], 1)]
            + [str(s["n"])]
            + [f"{s[k]:.4g}" for k in ("acc_mean", "acc_std", "acc_min", "acc_max")]
            for s in summaries[r.label]
        ]
        title = f"{r.label}: test {r.metric} over replicates"
        section.tables.append(Table(title, cols, rows, str(r.path / "results.csv")))
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


# the variant that is each continual learner's own accuracy per task, and its name
LEARNERS = {
    "task-given": "SupSup",
    "clnp": "CLNP",
    "finetune": "fine-tuning",
    "hopfield": "SupSup, masks read back from a Hopfield network",
}


def continual_section(runs, out: Path) -> Section:
    """Continual learners (SupSup, CLNP, fine-tuning): each task's accuracy as later tasks
    are learned (and SupSup's with the id inferred); the learners side by side (mean
    accuracy over the tasks learned so far); and, for SupSup's Hopfield store, how well
    the masks are read back as tasks are added."""

    def key(row):
        if row["variant"] == "task-inferred":
            return ("id inferred", int(row["level"]) + 1)
        extra = " (hopfield)" if row["variant"] == "hopfield" else ""
        return (f"task {row['eval_task']}{extra}", int(row["level"]) + 1)

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
    figs = [(png, f"Accuracy per task and with the task inferred (mean, {figures.BAND_NOTE}).")]
    compared, table = learner_comparison(runs)
    if compared:
        png = figures.metric_vs_x(
            compared,
            "tasks learned",
            "mean test accuracy % over the tasks learned",
            "Continual learners side by side",
            out / "continual.png",
            integer_x=True,
        )
        figs.append(
            (
                png,
                "Mean test accuracy over every task learned so far, each with its own mask or "
                f"head (task id given; mean over replicates, {figures.BAND_NOTE}).",
            )
        )
        tables.insert(0, table)
    text = ""
    hop = [r for r in runs if any(q["variant"] == "hopfield" for q in r.rows)]
    if hop:
        more_figs, more_tables, text = hopfield_part(hop, out)
        figs += more_figs
        tables[1:1] = more_tables
    return Section("Continual learning", text=text, figures=figs, tables=tables)


def _done(row) -> bool:
    return row.get("status", "done") in ("done", "")


def _per_level(run: Run, variant: str, value) -> dict[int, list[float]]:
    """``value(rows)`` of each replicate's rows of ``variant`` at each level."""
    groups: dict[tuple[int, str], list[dict]] = {}
    for row in run.rows:
        if row["variant"] == variant and _done(row):
            groups.setdefault((int(row["level"]), str(row["replicate"])), []).append(row)
    out: dict[int, list[float]] = {}
    for (level, _), rows in sorted(groups.items()):
        out.setdefault(level, []).append(value(rows))
    return out


def _mean_acc(rows) -> float:
    return sum(_num(r["test_accuracy"]) for r in rows) / len(rows)


def learner_comparison(runs) -> tuple[list[dict], Table]:
    """One line per run and learner: mean accuracy over the tasks learned so far."""
    series, rows = [], []
    kinds = [(r, v) for r in runs for v in LEARNERS if any(q["variant"] == v for q in r.rows)]
    names = [LEARNERS[v] for _, v in kinds]
    for r, v in kinds:
        name = LEARNERS[v] if names.count(LEARNERS[v]) == 1 else f"{LEARNERS[v]} ({r.label})"
        acc = _per_level(r, v, _mean_acc)
        first = _per_level(
            r,
            v,
            lambda rs: next(
                (_num(q["test_accuracy"]) for q in rs if _num(q["eval_task"]) == 0), float("nan")
            ),
        )
        used = _per_level(r, v, lambda rs: _num(rs[0].get("capacity_used")))
        levels = sorted(acc)
        stats = [mean_std(acc[k]) for k in levels]
        series.append(
            {
                "label": name,
                "x": [k + 1 for k in levels],
                "mean": [100 * m for m, _ in stats],
                "std": [100 * sd for _, sd in stats],
            }
        )
        for k, (m, sd) in zip(levels, stats):
            cap = mean_std(used[k])[0]
            rows.append(
                [
                    name,
                    str(k + 1),
                    str(len(acc[k])),
                    _pct(m),
                    _pct(sd),
                    _pct(mean_std(first[k])[0]),
                    "" if math.isnan(cap) else _pct(cap, 1),
                ]
            )
    cols = ["learner", "tasks learned", "n", "mean acc % over tasks", "std", "task 0 acc %"]
    cols.append("units used %")
    source = ", ".join(str(r.path / "results.csv") for r, _ in kinds)
    return series, Table("Continual learners: accuracy as tasks are added", cols, rows, source)


def hopfield_part(runs, out: Path) -> tuple[list, list[Table], str]:
    """SupSup's Hopfield store: Hamming distance of the read-back masks to the stored ones,
    and accuracy with them next to the stored masks', against the number of tasks stored;
    where recovery stops being exact and where the stored masks stop being attractors."""
    ham, acc, tables, notes = [], [], [], []
    for r in runs:
        frac = _per_level(
            r, "hopfield", lambda rs: sum(_num(q["hamming_fraction"]) for q in rs) / len(rs)
        )
        count = _per_level(r, "hopfield", lambda rs: sum(_num(q["hamming"]) for q in rs) / len(rs))
        flips = _per_level(
            r, "hopfield", lambda rs: max(_num(q.get("attractor_flips")) for q in rs)
        )
        worst = _per_level(r, "hopfield", lambda rs: max(_num(q["hamming"]) for q in rs))
        hop_acc = _per_level(r, "hopfield", _mean_acc)
        given = _per_level(r, "task-given", _mean_acc)
        levels = sorted(frac)
        x = [k + 1 for k in levels]
        fs = [mean_std(frac[k]) for k in levels]
        ham.append(
            {
                "label": r.label,
                "x": x,
                "mean": [100 * m for m, _ in fs],
                "std": [100 * s for _, s in fs],
            }
        )
        for label, src in (("Hopfield store", hop_acc), ("explicit masks", given)):
            st = [mean_std(src[k]) if k in src else (float("nan"), 0.0) for k in levels]
            acc.append(
                {
                    "label": f"{r.label} {label}",
                    "x": x,
                    "mean": [100 * m for m, _ in st],
                    "std": [100 * s for _, s in st],
                }
            )
        rows = []
        for k in levels:
            rows.append(
                [
                    str(k + 1),
                    f"{mean_std(count[k])[0]:.1f}",
                    _pct(mean_std(frac[k])[0]),
                    f"{max(flips[k]):g}",
                    _pct(mean_std(hop_acc[k])[0]),
                    _pct(mean_std(given[k])[0]) if k in given else "",
                ]
            )
        cols = ["tasks stored", "Hamming distance (mean)", "Hamming %", "attractor flips (max)"]
        cols += ["acc % Hopfield store", "acc % explicit masks"]
        tables.append(
            Table(
                f"{r.label}: masks read back from the Hopfield network",
                cols,
                rows,
                str(r.path / "results.csv"),
            )
        )
        exact = 0
        for k in levels:
            if max(worst[k]) > 0:
                break
            exact = k + 1
        full = next((k + 1 for k in levels if max(flips[k]) > 0), None)
        cap = (
            f"the stored masks stop being attractors at {full} tasks (capacity runs out)"
            if full is not None
            else f"the stored masks are still attractors at {levels[-1] + 1} tasks"
        )
        notes.append(f"{r.label}: recovery exact up to {exact} stored task(s); {cap}.")
    figs = [
        (
            figures.metric_vs_x(
                ham,
                "tasks stored",
                "Hamming distance % (read back vs stored)",
                "Masks read back from a Hopfield network",
                out / "hopfield.png",
                integer_x=True,
            ),
            "Hamming distance between each task's read-back and stored mask, mean over tasks "
            f"({figures.BAND_NOTE}).",
        ),
        (
            figures.metric_vs_x(
                acc,
                "tasks stored",
                "mean test accuracy % over the tasks",
                "Hopfield store against explicit masks",
                out / "hopfield_accuracy.png",
                integer_x=True,
            ),
            f"Accuracy with the read-back masks and with the stored ones ({figures.BAND_NOTE}).",
        ),
    ]
    return figs, tables, " ".join(notes)


def _total_params(run: Run) -> int | None:
    """All parameters of the dense network a run's spec names (None: not rebuildable)."""
    from ..data.registry import DATASETS
    from ..metrics import parameter_count
    from ..models import build

    spec = run.spec.get("spec", {})
    ident = run.spec.get("identity", {})
    name, dataset = spec.get("model"), spec.get("dataset")
    if name is None or dataset not in DATASETS or ident.get("model", name) != name:
        return None
    if ident.get("dataset", dataset) != dataset:
        return None
    info = DATASETS[dataset]
    try:
        return parameter_count(build(name, info.input_shape, info.num_classes, spec["width"]))
    except UsageError:
        return None


def row_params(row: dict, total: int | None) -> float:
    """A row's parameter count: its ``params`` column (a network made physically smaller:
    structured, low-rank), else its nonzero parameters, ``density_all`` x the dense count."""
    if row.get("params") not in (None, ""):
        return _num(row["params"])
    if total is None:
        return float("nan")
    return _num(row.get("density_all")) * total


def parameters_section(runs, out: Path) -> Section:
    """Test accuracy against parameters: low-rank replacement beside magnitude and
    structured pruning (or any run), one line per method and variant over all runs."""
    groups: dict[str, dict[float, list[float]]] = {}  # dense networks of all runs: one line
    for r in runs:
        total = _total_params(r)
        for row in r.rows:
            if row.get("status", "done") not in ("done", ""):
                continue
            x = row_params(row, total)
            if math.isnan(x):
                continue
            method = row.get("method") or r.method
            line = "dense" if row["variant"] == "dense" else f"{method}: {row['variant']}"
            groups.setdefault(line, {}).setdefault(round(x), []).append(_num(row["test_accuracy"]))
    series, rows = [], []
    for line, points in sorted(groups.items()):
        xs = sorted(points)
        stats = [mean_std(points[x]) for x in xs]
        series.append(
            {
                "label": line,
                "x": xs,
                "mean": [100 * m for m, _ in stats],
                "std": [100 * sd for _, sd in stats],
            }
        )
        for x, (m, sd) in zip(xs, stats):
            rows.append([line, f"{x:,}", str(len(points[x])), _pct(m), _pct(sd)])
    png = figures.metric_vs_x(
        series,
        "parameters (nonzero, or of the smaller network)",
        "test accuracy %",
        "Accuracy against parameters",
        out / "parameters.png",
        log_x=True,
    )
    cols = ["method: variant", "parameters", "n", "test acc % mean", "std"]
    return Section(
        "Accuracy against parameters",
        figures=[
            (
                png,
                "Test accuracy against parameter count: low-rank factors, pruned networks "
                f"(nonzero parameters) and structurally smaller ones (mean, {figures.BAND_NOTE}).",
            )
        ],
        tables=[Table("accuracy against parameters", cols, rows, "results.csv of each run")],
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


# analyses over training and over units ------------------------------------------------


def fisher_marks(runs) -> list[tuple[float, str]]:
    """Steps to mark on a Fisher curve: each early-bird run's draw (its drawing epoch in
    steps) and each stability run's rewind points."""
    marks = []
    for r in runs:
        spe = r.spec.get("steps_per_epoch")
        epochs = sorted(
            {
                int(_num(row["draw_epoch"]))
                for row in r.rows
                if _num(row.get("draw_epoch")) == _num(row.get("draw_epoch"))
            }
        )  # noqa: E501
        if spe and epochs:
            marks += [(float(e * spe), f"early-bird draw ({r.label})") for e in epochs]
        ks = sorted({int(_num(row["rewind_step"])) for row in r.rows if row.get("rewind_step")})
        marks += [(float(k), f"stability rewind k={k} ({r.label})") for k in ks]
    return marks


def fisher_section(runs, out: Path) -> Section | None:
    """The trace of the Fisher information against the step (``fisher.csv``), dense level
    and tickets overlaid (means over replicates), per layer for the dense level, with the
    early-bird draw and the stability rewind points of the other runs marked."""
    with_fisher = [r for r in runs if (r.path / "fisher.csv").exists()]
    if not with_fisher:
        return None
    series, layers, tables = [], [], []
    for r in with_fisher:
        rows = read_csv(r.path / "fisher.csv")
        groups: dict[tuple, list[float]] = {}
        density: dict[tuple, float] = {}
        for row in rows:
            key = (int(row["level"]), row["variant"], row["layer"], int(row["step"]))
            groups.setdefault(key, []).append(_num(row["trace"]))
            density[key[:2]] = _num(row["density"])
        levels = sorted({k[:2] for k in groups})
        table_rows = []
        for level, variant in levels:
            pts = sorted((k[3], v) for k, v in groups.items() if k[:3] == (level, variant, "all"))
            d = density[(level, variant)]
            name = f"{r.label} level {level} {variant} ({_pct(d, 1)}%)"
            means = [mean_std(v) for _, v in pts]
            series.append(
                {"label": name, "step": [s for s, _ in pts], "trace": [m for m, _ in means],
                 "density": d}
            )  # fmt: skip
            table_rows += [
                [str(level), variant, _pct(d, 1), str(s), str(len(v)), f"{m:.4g}", f"{sd:.3g}"]
                for (s, v), (m, sd) in zip(pts, means)
            ]
        first = levels[0] if levels else None
        names = sorted({k[2] for k in groups if k[:2] == first and k[2] != "all"})
        for layer in names:
            pts = sorted((k[3], mean_std(v)[0]) for k, v in groups.items()
                         if k[:3] == (*first, layer))  # fmt: skip
            layers.append(
                {"label": f"{r.label} {layer}", "step": [p[0] for p in pts],
                 "trace": [p[1] for p in pts]}
            )  # fmt: skip
        tables.append(
            Table(
                f"{r.label}: trace of the Fisher information",
                ["level", "variant", "weights %", "step", "n", "trace mean", "std"],
                table_rows,
                str(r.path / "fisher.csv"),
            )
        )
    marks = fisher_marks(runs)
    png = figures.fisher_curves(series, layers, marks, out / "fisher.png")
    return Section(
        "Fisher information over training",
        text="Trace of the Fisher information E_x E_{y~p(y|x)} ||∇ log p(y|x)||² at each saved"
        " step (Achille, Rovere & Soatto 2019), labels sampled from the model; a ticket's"
        " trace counts its kept weights only. Red lines: early-bird draw steps and"
        " stability rewind points of the runs given.",
        figures=[
            (
                png,
                "Fisher trace against step: dense level (black) and tickets; right, per"
                " layer of the dense level (means over replicates).",
            )
        ],  # fmt: skip
        tables=tables,
    )


def dissect_section(runs, out: Path) -> Section | None:
    """Interpretable units and concepts per layer against density (``dissect.csv``), with
    test accuracy on the same axes (means over replicates)."""
    with_units = [r for r in runs if (r.path / "dissect.csv").exists()]
    if not with_units:
        return None
    section = Section(
        "Interpretable units (dissection)",
        text="A unit is interpretable when it is a class detector (class selectivity index,"
        " Morcos et al. 2018, at least the threshold) or a concept detector (IoU of its"
        " top-quantile activation map with a concept mask at least the IoU threshold, network"
        " dissection); concepts are the distinct classes and concepts a layer's units detect"
        " (Frankle & Bau 2019 read their count against density).",
    )
    for r in with_units:
        rows = [x for x in read_csv(r.path / "dissect.csv") if x["variant"] in ("ticket", "dense")]
        layer_names = list(dict.fromkeys(x["layer"] for x in rows))
        by_level: dict[int, list[dict]] = {}
        for x in rows:
            by_level.setdefault(int(x["level"]), []).append(x)
        levels, table_rows = [], []
        for level, xs in sorted(by_level.items()):
            reps = {x["replicate"] for x in xs}
            entry = {"density": sum(_num(x["density"]) for x in xs) / len(xs), "units": {},
                     "concepts": {}}  # fmt: skip
            accs = {x["replicate"]: _num(x["test_accuracy"]) for x in xs}
            entry["accuracy"] = sum(accs.values()) / len(accs)
            for name in layer_names:
                here = [x for x in xs if x["layer"] == name]
                entry["units"][name] = sum(int(x["interpretable"]) for x in here) / len(reps)
                entry["concepts"][name] = sum(int(x["concepts"]) for x in here) / len(reps)
                table_rows.append(
                    [str(level), _pct(entry["density"], 1), _pct(entry["accuracy"]), name,
                     here[0]["units"] if here else "",
                     f"{sum(int(x['class_detectors']) for x in here) / len(reps):g}",
                     f"{sum(int(x['concept_detectors']) for x in here) / len(reps):g}",
                     f"{entry['units'][name]:g}", f"{entry['concepts'][name]:g}",
                     here[0]["labels"] if len(reps) == 1 and here else ""]
                )  # fmt: skip
            levels.append(entry)
        png = figures.dissection(
            levels, layer_names, f"{r.label}: interpretable units",
            out / f"dissect-{_slug(r.label)}.png",
        )  # fmt: skip
        section.figures.append(
            (png, f"{r.label}: interpretable units (left) and concepts (right) per layer,"
                  " test accuracy dashed.")
        )  # fmt: skip
        section.tables.append(
            Table(
                f"{r.label}: dissection per level and layer",
                ["level", "weights %", "test acc %", "layer", "units", "class det.",
                 "concept det.", "interpretable", "concepts", "labels"],
                table_rows,
                str(r.path / "dissect.csv"),
            )
        )  # fmt: skip
    return section


def double_descent_section(runs, summaries, out: Path) -> Section | None:
    """Test accuracy against density of lottery runs, with and without label noise, and
    the points of a sparse double descent (He et al. 2022) marked where the curve has one:
    the two test-error minima and the error peak between them."""
    from ..analysis import double_descent_points

    lottery = [r for r in runs if r.method == "lottery"]
    if not any("label_noise" in (r.spec.get("identity") or {}) for r in lottery):
        return None
    series, rows = [], []
    for r in lottery:
        noise = (r.spec.get("identity") or {}).get("label_noise", 0.0)
        ss = sorted((s for s in summaries[r.label] if s["variant"] == "ticket"),
                    key=lambda s: -s["density"])  # fmt: skip
        if not ss:
            continue
        acc = [100 * s["acc_mean"] for s in ss]
        sd = [100 * s["acc_std"] for s in ss]
        pts = double_descent_points(acc, sd, tol=0.2)
        series.append(
            {
                "label": f"{r.label} (label noise {noise:g})",
                "density": [s["density"] for s in ss],
                "mean": acc,
                "std": sd,
                "points": pts,
            }
        )
        if pts is None:
            rows.append([r.label, f"{noise:g}", "no dip", "", "", ""])
        else:
            j, i, k = pts
            rows.append(
                [r.label, f"{noise:g}", str(ss[0]["n"])]
                + [f"{_pct(ss[t]['density'], 1)}% ({acc[t]:.2f})" for t in (j, i, k)]
            )
    png = figures.double_descent(series, "Sparse double descent", out / "double_descent.png")
    return Section(
        "Sparse double descent",
        text="Tickets' test accuracy (clean test labels) against weights remaining, runs with"
        " and without label noise on the training labels. Marked where a curve dips and"
        " recovers by more than the std over replicates (and 0.2 pp): the two test-error"
        " minima (▼) and the error peak between them (△), as He et al. 2022 describe.",
        figures=[(png, f"Test accuracy (mean, {figures.BAND_NOTE}).")],
        tables=[
            Table(
                "double descent points: weights % (test acc %)",
                ["run", "label noise", "n", "error minimum 1", "error peak", "error minimum 2"],
                rows,
            )
        ],
    )


def fisher_figure(run_dirs, out_dir) -> Path:
    """``fisher.png`` in ``out_dir`` for runs that hold ``fisher.csv`` (other runs mark)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    section = fisher_section(load_runs(run_dirs), out)
    if section is None:
        raise UsageError("no fisher.csv in the given runs: run ticketlab fisher first")
    return section.figures[0][0]
