"""Command-line front end: each subcommand builds a spec and calls the API.

Exit codes: 0 done; 2 bad usage or bad spec (nothing written); 1 a failure at
run time; 130 interrupted (the same command resumes the run).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .errors import RunInterrupted, UsageError

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str):
        raise UsageError(message)


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def _common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--preset", help="named setup (ticketlab list presets); flags override it")
    g.add_argument("--model", help="model name (ticketlab list models)")
    g.add_argument("--width", type=float, help="width multiplier")
    g.add_argument("--init", help="kaiming_normal, kaiming_uniform, xavier_normal, ...")
    g.add_argument("--dataset", help="dataset name (ticketlab list datasets)")
    g.add_argument("--data-dir", help="where the dataset files are")
    g.add_argument("--val-size", type=int, help="examples held out of training for validation")
    g.add_argument(
        "--augment",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="crop+flip augmentation (default: on for CIFAR-10)",
    )
    g.add_argument("--steps", help="budget of each training phase: '50000it' or '40ep'")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", help="sgd or adam")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", help="constant, step or cosine")
    g.add_argument("--milestones", type=_list, help="step schedule milestones: '80ep,120ep'")
    g.add_argument("--gamma", type=float, help="step schedule factor")
    g.add_argument("--warmup", help="linear warmup length: '500it'")
    g.add_argument("--eval-every", help="evaluation (and checkpoint) interval: '100it'")
    g.add_argument("--seed", type=int)
    g.add_argument("--init-seed", type=int)
    g.add_argument("--data-seed", type=int)
    g.add_argument("--aug-seed", type=int)
    g.add_argument("--replicates", type=int, help="independent runs with distinct seeds")
    g.add_argument("--runs-dir", help="where run directories go (default: runs)")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any spec field, e.g. --set eval_batch_size=500",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress or table")


def _lottery_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--levels", type=int, help="pruning levels after the dense level 0")
    g.add_argument(
        "--prune-fraction",
        type=float,
        help="fraction of remaining weights pruned per level (fully connected)",
    )
    g.add_argument("--conv-prune-fraction", type=float, help="per-level fraction for conv layers")
    g.add_argument("--output-prune-fraction", type=float, help="per-level fraction, output layer")
    g.add_argument("--scope", "--allocation", dest="scope", help="layerwise or global")
    g.add_argument(
        "--dense-layers",
        type=_list,
        help="layers left unpruned: 'first', 'output' or parameter names",
    )
    g.add_argument(
        "--criterion",
        help="score pruned at each level: magnitude (default), random, or a data-based one "
        "(snip, grasp, taylor, ...; see ticketlab list criteria)",
    )
    g.add_argument("--rewind", help="rewind step k: '0it' is the original lottery ticket")
    g.add_argument("--protocol", help="rewind, finetune or lr-rewind (Renda et al. 2020)")
    g.add_argument("--retrain-steps", help="retraining budget t for finetune and lr-rewind")
    g.add_argument(
        "--controls",
        type=_list,
        help="comma list of reinit, reshuffle, signed-constant, random-mask",
    )


def build_parser() -> Parser:
    parser = Parser(prog="ticketlab", description="A laboratory for sparse neural networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    p = sub.add_parser("lottery", help="iterative magnitude pruning with rewinding")
    _common(p)
    _lottery_flags(p)
    p = sub.add_parser("train", help="train a dense baseline")
    _common(p)
    p = sub.add_parser("list", help="list models, datasets, criteria, presets or methods")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "models", "datasets", "criteria", "presets", "methods"],
    )
    p = sub.add_parser("show", help="table of a run's results")
    p.add_argument("run_dir")
    p.add_argument("--quiet", action="store_true")
    # Other methods add their subcommands: add_parsers(sub, common, lottery_flags), each
    # parser setting `handler` (a function of the parsed args returning an exit code).
    for name in EXTENSIONS:
        importlib.import_module(name).add_parsers(sub, _common, _lottery_flags)
    return parser


EXTENSIONS: list[str] = [
    "ticketlab.report.cli",
    "ticketlab.pruning.cli",
    "ticketlab.methods.sparse_cli",
    "ticketlab.methods.masking_cli",
    "ticketlab.methods.structured_cli",
]


def spec_from_args(args: argparse.Namespace, method: str, cls: type | None = None):
    """Preset, then ``--set`` values, then explicit flags, into a spec of class ``cls``."""
    from .presets import preset
    from .spec import Spec, coerce, spec_fields

    cls = cls or Spec
    values: dict = {}
    if args.preset:
        values.update(preset(args.preset))
    for item in args.set:
        if "=" not in item:
            raise UsageError(f"--set expects KEY=VALUE; got {item!r}")
        key, text = item.split("=", 1)
        key = key.strip().replace("-", "_")
        values[key] = coerce(key, text, cls)
    known = spec_fields(cls)
    for key, value in vars(args).items():
        if key in known and value is not None:
            values[key] = value
    values["method"] = method
    if method == "train":
        values.pop("levels", None)
    return cls(**values)


def run_experiment(spec, experiment_cls=None) -> int:
    """Run an experiment with a progress bar per phase and print its results table."""
    from .methods.lottery import Experiment
    from .report_table import print_results
    from .train import stop_on_signals

    exp = (experiment_cls or Experiment)(spec)  # validates and loads data: nothing written yet
    progress = None
    if not spec.quiet:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            transient=True,
        )
        print(f"run directory: {exp.dir}", file=sys.stderr)
    with stop_on_signals():
        if progress is not None:
            with progress:
                rows = exp.run(progress)
        else:
            rows = exp.run()
    if not spec.quiet:
        print_results(rows, title=str(exp.dir))
    return 0


def cmd_list(what: str) -> int:
    from rich.console import Console
    from rich.table import Table

    from .data import describe_datasets
    from .models import describe_models
    from .presets import describe_presets
    from .pruning import CRITERIA

    console = Console()
    sections = ["models", "datasets", "criteria", "presets", "methods"] if what == "all" else [what]
    for section in sections:
        if section == "models":
            rows = describe_models()
        elif section == "datasets":
            rows = describe_datasets()
        elif section == "criteria":
            rows = [
                {"name": k, "description": (f.__doc__ or "").strip().splitlines()[0]}
                for k, f in CRITERIA.items()
            ]
        elif section == "presets":
            rows = describe_presets()
        else:  # every subcommand that runs or analyses experiments, from the parser itself
            rows = [
                {"name": a.dest, "description": a.help}
                for a in _subcommands()
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


def _subcommands() -> list:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return list(sub._choices_actions)


def _show(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v))
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10000:
        return f"{v:,}"
    return str(v)


def cmd_show(run_dir: str) -> int:
    from .report_table import print_results
    from .runs import read_csv

    path = Path(run_dir) / "results.csv"
    if not path.exists():
        raise UsageError(f"no results in {run_dir} (no results.csv there)")
    print_results(read_csv(path), title=str(run_dir))
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "list":
            return cmd_list(args.what)
        if args.command == "show":
            return cmd_show(args.run_dir)
        if getattr(args, "handler", None) is not None:
            return args.handler(args)
        return run_experiment(spec_from_args(args, args.command))
    except UsageError as exc:
        print(f"ticketlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RunInterrupted, KeyboardInterrupt) as exc:
        reason = str(exc) or "interrupted"
        print(f"ticketlab: {reason}; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a failure at run time: one line, exit 1
        print(f"ticketlab: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
