"""The results table printed when a run ends and by ``ticketlab show``."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table


def diverged(rows: list[dict]) -> list[dict]:
    """Rows whose training diverged (status ``diverged``)."""
    return [r for r in rows if r.get("status") == "diverged"]


def _mean_of(rows: list[dict], key: str) -> float:
    """The mean of a column over the rows that have it (continual learners give the
    training columns on the row of the task just trained only); NaN if none does."""
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else math.nan


def headline(rows: list[dict]) -> str:
    """The metric the table shows: the one a run's ``select`` names (``val_<m>``, a custom
    objective's), else accuracy, else (a custom loss without metrics) the loss."""

    def has(key):
        return any(r.get(key) not in (None, "") for r in rows)

    select = next((r["select"] for r in rows if r.get("select")), "")
    name = select.rpartition(":")[2].removeprefix("val_")
    if name and name not in ("loss", "accuracy") and has(f"test_{name}"):
        return name
    return "accuracy" if has("test_accuracy") or not has("test_loss") else "loss"


def summarize(rows: list[dict], metric: str = "accuracy") -> list[dict]:
    """Mean and std over replicates for each (level, variant); diverged rows are counted
    in ``diverged``, not averaged. The means are of ``test_<metric>``, under the keys
    ``test_accuracy`` and ``test_accuracy_std`` whatever the metric."""
    groups: dict[tuple, list[dict]] = {}
    failed: dict[tuple, int] = {}
    for r in rows:
        key = (int(r["level"]), r["variant"])
        if r.get("status") == "diverged":
            failed[key] = failed.get(key, 0) + 1
            continue
        groups.setdefault(key, []).append(r)
    out = []
    for key in failed:
        if key not in groups:  # every replicate diverged: a row that says so
            first = next(r for r in rows if (int(r["level"]), r["variant"]) == key)
            density = float(first.get("density") or "nan")
            out.append({"level": key[0], "variant": key[1], "density": density, "n": 0})
            out[-1].update(test_accuracy=math.nan, test_accuracy_std=0.0, best_val_step=math.nan)
    for (level, variant), rs in sorted(groups.items()):
        acc = [float(r[f"test_{metric}"]) for r in rs]
        mean = sum(acc) / len(acc)
        std = math.sqrt(sum((a - mean) ** 2 for a in acc) / (len(acc) - 1)) if len(acc) > 1 else 0.0
        out.append(
            {
                "level": level,
                "variant": variant,
                "density": float(rs[0]["density"]),
                "n": len(rs),
                "test_accuracy": mean,
                "test_accuracy_std": std,
                "best_val_step": _mean_of(rs, "best_val_step"),
            }
        )
    for s in out:
        s["diverged"] = failed.get((s["level"], s["variant"]), 0)
    return sorted(out, key=lambda s: (s["level"], s["variant"]))


def print_results(rows: list[dict], title: str = "", console: Console | None = None) -> None:
    """Test accuracy and early-stop step per level: the ticket and each control side by side.

    Values are the mean over replicates, with the std when there are several.
    The early-stop step is the step of minimum validation loss.
    """
    console = console or Console()
    if rows and "generation" in rows[0]:
        print_search(rows, title, console)
        return
    metric = headline(rows)
    summary = summarize(rows, metric)
    # accuracy in percent, as before; another metric (a custom objective's) as it is
    scale, label, fmt = (100, "acc %", ".2f") if metric == "accuracy" else (1, metric, ".4g")
    variants = []
    for s in summary:
        if s["variant"] not in variants:
            variants.append(s["variant"])
    by_level: dict[int, dict] = {}
    for s in summary:
        by_level.setdefault(s["level"], {})[s["variant"]] = s
    table = Table(title=title, title_justify="left")
    table.add_column("level", justify="right")
    table.add_column("weights %", justify="right")
    for v in variants:
        table.add_column(f"{v} {label}", justify="right")
    for v in variants:
        table.add_column(f"{v} early stop", justify="right")
    table.add_column("n", justify="right")
    for level in sorted(by_level):
        cells = by_level[level]
        first = cells.get("ticket") or next(iter(cells.values()))
        row = [str(level), f"{100 * first['density']:.1f}"]
        for v in variants:
            s = cells.get(v)
            if s is None:
                row.append("")
            elif s["n"] == 0:
                row.append("diverged")
            elif s["n"] > 1:
                m, sd = scale * s["test_accuracy"], scale * s["test_accuracy_std"]
                row.append(f"{m:{fmt}} ± {sd:{fmt}}")
            else:
                row.append(f"{scale * s['test_accuracy']:{fmt}}")
        for v in variants:
            s = cells.get(v)
            row.append("" if s is None or s["n"] == 0 else f"{s['best_val_step']:.0f}")
        row.append(str(first["n"]))
        table.add_row(*row)
    console.print(table)
    for r in diverged(rows):
        last = r.get("test_accuracy")
        tail = (
            f"; last finite test accuracy {100 * float(last):.2f}%"
            if last not in (None, "")
            else ""
        )
        console.print(
            f"[bold red]diverged[/]: replicate {r['replicate']} level {r['level']} "
            f"{r['variant']}, loss non-finite at step {r.get('diverged_step', '?')}{tail}"
        )
    for level, (macs, measured) in sorted(_speedups(rows).items()):
        console.print(
            f"level {level}: {macs}x fewer multiply-adds, {measured}x faster on a test batch"
        )


def _cell(v, digits: int = 3) -> str:
    try:
        return f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return str(v)


def print_search(rows: list[dict], title: str, console: Console) -> None:
    """A topology search (``ticketlab wann``): the last generation of each replicate and
    the variants scored after the search, mean and best over the shared weights."""
    table = Table(title=title, title_justify="left")
    for c in ("rep", "variant", "gen", "split", "mean perf", "best perf", "best w", "conns"):
        table.add_column(c, justify="right")
    table.add_column("solved")
    last: dict[int, dict] = {}
    for r in rows:
        if r["variant"] == "search":
            last[int(r["replicate"])] = r
    shown = list(last.values()) + [r for r in rows if r["variant"] != "search"]
    for r in sorted(shown, key=lambda r: int(r["replicate"])):
        cells = [r["replicate"], r["variant"], r["generation"], r.get("split", "")]
        cells += [_cell(r["mean_performance"]), _cell(r["best_performance"])]
        cells += [_cell(r.get("best_weight", ""), 2), r["connections"], r.get("solved", "")]
        table.add_row(*(str(c) for c in cells))
    console.print(table)


def _speedups(rows: list[dict]) -> dict[int, list[str]]:
    """Per level, the multiply-add and measured inference speedups (means over replicates)
    of rows that carry ``inference_speedup``; empty when none do."""
    by_level: dict[int, list[tuple[float, float]]] = {}
    for r in rows:
        try:
            pair = (float(r["flops_speedup"]), float(r["inference_speedup"]))
        except (KeyError, TypeError, ValueError):
            continue
        by_level.setdefault(int(r["level"]), []).append(pair)
    return {
        level: [f"{sum(a for a, _ in p) / len(p):.2f}", f"{sum(b for _, b in p) / len(p):.2f}"]
        for level, p in by_level.items()
    }
