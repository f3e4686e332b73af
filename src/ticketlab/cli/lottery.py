"""``ticketlab lottery`` and ``train`` (iterative magnitude pruning and the dense
baseline), and the run-independent ``list`` and ``show``."""

from __future__ import annotations

from pathlib import Path

from ..errors import UsageError
from .common import method_command


def add_parsers(sub) -> None:
    method_command(
        sub,
        "lottery",
        "iterative magnitude pruning with rewinding",
        "ticketlab.methods.lottery",
        "Spec",
        "LotteryExperiment",
        lottery=True,
        vectorize=True,
    )
    method_command(
        sub,
        "train",
        "train a dense baseline",
        "ticketlab.methods.lottery",
        "Spec",
        "LotteryExperiment",
        vectorize=True,
    )
    p = sub.add_parser("list", help="list models, datasets, criteria, presets or methods")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "models", "datasets", "criteria", "presets", "methods"],
    )
    p.set_defaults(handler=lambda args: cmd_list(args.what, sub))
    p = sub.add_parser("show", help="table of a run's results")
    p.add_argument("run_dir")
    p.add_argument(
        "--disk",
        action="store_true",
        help="bytes of the run's tensor files per level, against storing them densely",
    )
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=lambda args: cmd_show(args.run_dir, disk=args.disk))


def cmd_list(what: str, sub=None) -> int:
    """Print the registries; ``sub`` (the subparsers) lists the methods."""
    from rich.console import Console
    from rich.table import Table

    from ..data import describe_datasets
    from ..models import describe_models
    from ..presets import describe_presets
    from ..pruning import CRITERIA

    console = Console()
    sections = ["models", "datasets", "criteria", "presets", "methods"] if what == "all" else [what]
    for section in sections:
        if section == "models":
            rows = describe_models()
        elif section == "datasets":
            rows = describe_datasets() + [
                {
                    "name": "imagefolder",
                    "source": "files: --data-dir DIR with train/<class>/*.png|jpg, val/<class>/",
                    "description": "images read while training by --workers processes (Pillow)",
                }
            ]
        elif section == "criteria":
            rows = [
                {"name": k, "description": (f.__doc__ or "").strip().splitlines()[0]}
                for k, f in CRITERIA.items()
            ]
        elif section == "presets":
            rows = describe_presets()
        else:  # every subcommand that runs or analyses experiments, from the parser itself
            from .common import SETUPS

            rows = [
                {"name": a.dest, "description": a.help, "defaults from": SETUPS.get(a.dest, "")}
                for a in sub._choices_actions
                if a.dest not in ("list", "show")
            ]
        if section == "presets":
            for row in rows:
                console.print(f"[bold]{row.pop('name')}[/bold]: {row.pop('about')}")
                shown = ("auto" if v is None else _show(v) for v in row.values())
                console.print("  " + "  ".join(f"{k}={v}" for k, v in zip(row, shown)))
            continue
        table = Table(title=section, title_justify="left")
        cols = list(rows[0]) if rows else []
        for c in cols:
            table.add_column(c)
        for row in rows:
            table.add_row(*[_show(row.get(c)) for c in cols])
        console.print(table)
    return 0


def _show(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def cmd_show(run_dir: str, disk: bool = False) -> int:
    from ..report.table import print_results
    from ..runs import read_csv

    if disk:
        return show_disk(run_dir)
    path = Path(run_dir) / "results.csv"
    if not path.exists():
        raise UsageError(f"no results in {run_dir} (no results.csv there)")
    print_results(read_csv(path), title=str(run_dir))
    return 0


def show_disk(run_dir: str) -> int:
    """Bytes per level of a run's tensor files (masks, weights, checkpoints), summed over
    replicates and variants, beside what they would take stored densely."""
    from ..runs import disk_usage
    from .common import print_table

    if not Path(run_dir, "spec.json").exists():
        raise UsageError(f"{run_dir} is not a run directory (no spec.json there)")
    rows = disk_usage(run_dir)
    if rows:
        total = {"level": "total"}
        for key in rows[0]:
            if key != "level":
                total[key] = sum(r[key] for r in rows)
        rows.append(total)

    def ratio(a: int, b: int) -> str:
        return f"1/{b / a:.1f}" if a and a < b else "1" if a else "-"

    def size(n: int) -> str:
        for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if n >= scale:
                return f"{n / scale:.2f} {unit}"
        return f"{n} B"

    print_table(
        f"{run_dir}: tensor files (dense: the same tensors stored densely)",
        ["level", "files", "bytes", "dense", "ratio", "weights", "dense", "ratio"],
        [
            [
                str(r["level"]),
                str(r["files"]),
                size(r["bytes"]),
                size(r["dense_bytes"]),
                ratio(r["bytes"], r["dense_bytes"]),
                size(r["weight_bytes"]),
                size(r["weight_dense_bytes"]),
                ratio(r["weight_bytes"], r["weight_dense_bytes"]),
            ]
            for r in rows
        ],
    )
    return 0
