"""The results table printed when a run ends and by ``ticketlab show``."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def print_results(rows: list[dict], title: str = "", console: Console | None = None) -> None:
    """Test accuracy and early-stop step per level: the ticket and each control side by side.

    Values are the mean over replicates, with the std when there are several.
    The early-stop step is the step of minimum validation loss.
    """
    from .methods.lottery import summarize

    console = console or Console()
    summary = summarize(rows)
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
        table.add_column(f"{v} acc %", justify="right")
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
            elif s["n"] > 1:
                row.append(f"{100 * s['test_accuracy']:.2f} ± {100 * s['test_accuracy_std']:.2f}")
            else:
                row.append(f"{100 * s['test_accuracy']:.2f}")
        for v in variants:
            s = cells.get(v)
            row.append("" if s is None else f"{s['best_val_step']:.0f}")
        row.append(str(first["n"]))
        table.add_row(*row)
    console.print(table)
