"""What every subcommand shares: the parser class, flag builders, the spec from the
flags, and running an experiment with progress and a results table."""

from __future__ import annotations

import argparse
import functools
import importlib
import sys

from ..errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line and exits 2."""

    def error(self, message: str):
        raise UsageError(message)


def parse_list(text: str) -> tuple[str, ...]:
    """A comma list of names: ``'a, b,c'`` -> ``('a', 'b', 'c')``."""
    return tuple(s.strip() for s in text.split(",") if s.strip())


def parse_ints(text: str) -> tuple[int, ...]:
    """A comma list of integers."""
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"expected a comma list of integers; got {text!r}") from None


def toggle(group, flag: str, help: str, **kwargs) -> None:
    """A ``--flag/--no-flag`` pair that leaves the spec's default alone when absent."""
    group.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=None, help=help, **kwargs
    )


def target_flags(group, what: str = "weights", sparsity_help: str | None = None, density_help=None):
    """``--sparsity S`` or ``--density D`` (one of them): the target of a pruning rule."""
    target = group.add_mutually_exclusive_group()
    target.add_argument(
        "--sparsity", type=float, help=sparsity_help or f"fraction of {what} removed, in (0, 1)"
    )
    target.add_argument(
        "--density", type=float, help=density_help or f"fraction of {what} kept, in (0, 1)"
    )
    return target


def common_flags(p: argparse.ArgumentParser) -> None:
    """The flags of every experiment: model, data, training, seeds, replicates, run store."""
    g = p.add_argument_group("experiment")
    g.add_argument("--preset", help="named setup (ticketlab list presets); flags override it")
    g.add_argument("--model", help="model name (ticketlab list models)")
    g.add_argument("--width", type=float, help="width multiplier")
    g.add_argument("--init", help="kaiming_normal, kaiming_uniform, xavier_normal, ...")
    g.add_argument("--dataset", help="dataset name (ticketlab list datasets)")
    g.add_argument("--data-dir", help="where the dataset files are")
    g.add_argument("--val-size", type=int, help="examples held out of training for validation")
    toggle(
        g,
        "--augment",
        "crop+flip augmentation (default: on for CIFAR-10 and imagefolder, which uses a "
        "random-resized crop)",
    )
    g.add_argument(
        "--workers",
        type=int,
        help="DataLoader worker processes that decode and augment imagefolder images "
        "(default 0: in the training process); the batches do not depend on it",
    )
    g.add_argument(
        "--bad-files",
        help="an imagefolder image that cannot be decoded: fail (default, naming it) or skip",
    )
    g.add_argument("--image-size", type=int, help="imagefolder side (default: the first image's)")
    g.add_argument(
        "--prunable",
        type=parse_list,
        help="what may be pruned: kinds linear, conv, attention (MultiheadAttention "
        "in-projections), embedding, and parameter-name globs, e.g. 'linear,attention' or "
        "'*.in_proj_weight' (default: linear,conv weights)",
    )
    g.add_argument(
        "--prunable-exclude", type=parse_list, help="kinds or globs left out of --prunable"
    )
    g.add_argument(
        "--select",
        help="evaluation that picks the best (early-stopping) step: val_loss (default, "
        "lowest) or val_accuracy (highest)",
    )
    g.add_argument(
        "--patience",
        type=int,
        help="stop a phase after this many evaluations without a better --select "
        "(default 0: never)",
    )
    g.add_argument(
        "--label-noise",
        type=float,
        help="fraction of training labels changed to another class, seeded (default 0; the "
        "validation and test labels stay clean)",
    )
    g.add_argument("--steps", help="budget of each training phase: '50000it' or '40ep'")
    g.add_argument("--batch-size", type=int)
    g.add_argument("--optimizer", help="sgd, adam or rmsprop")
    g.add_argument("--lr", type=float)
    g.add_argument("--momentum", type=float)
    g.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--schedule", help="constant, step or cosine")
    g.add_argument("--milestones", type=parse_list, help="step schedule milestones: '80ep,120ep'")
    g.add_argument("--gamma", type=float, help="step schedule factor")
    g.add_argument("--warmup", help="linear warmup length: '500it'")
    g.add_argument("--eval-every", help="evaluation interval: '100it'")
    g.add_argument(
        "--checkpoint-every",
        help="checkpoint interval in steps (default 1000it; also every --checkpoint-seconds)",
    )
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        help="also checkpoint after this many seconds (default 60; 0: by steps only)",
    )
    g.add_argument(
        "--save-every",
        help="also save the weights every this many steps ('100it'), for ticketlab fisher; "
        "not part of the run's identity",
    )
    g.add_argument(
        "--kernels",
        help="how masked Linear layers train: dense (masked dense), sparse (CSR kernels) or "
        "auto (default: CSR where a short timing finds them faster, below 20%% density); "
        "not part of the run's identity",
    )
    g.add_argument(
        "--amp",
        help="mixed precision: none (default) or bf16 (autocast; weights, masks and "
        "optimizer state stay float32)",
    )
    g.add_argument(
        "--device",
        help="where models, masks and data live: auto (default: cuda when there is a CUDA "
        "device, else cpu), cpu, cuda or cuda:N; not part of the run's identity (a run "
        "started on one device resumes on another)",
    )
    toggle(
        g,
        "--compile",
        "torch.compile the forward pass (masks are kept outside it, so they stay exact); "
        "not part of the run's identity",
    )
    g.add_argument("--seed", type=int)
    g.add_argument("--init-seed", type=int)
    g.add_argument("--data-seed", type=int)
    g.add_argument("--aug-seed", type=int)
    g.add_argument("--replicates", type=int, help="independent runs with distinct seeds")
    g.add_argument(
        "--jobs",
        type=int,
        help="worker processes for the replicates, each with cores/jobs threads (default 1); "
        "the results are those of --jobs 1 with the same thread count",
    )
    g.add_argument("--runs-dir", help="where run directories go (default: runs)")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set any spec field, e.g. --set eval_batch_size=500",
    )
    g.add_argument("--quiet", action="store_true", default=None, help="no progress or table")


def lottery_flags(p: argparse.ArgumentParser) -> None:
    """The flags of iterative magnitude pruning: levels, rates, rewinding, controls."""
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
        type=parse_list,
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
        type=parse_list,
        help="comma list of reinit, reshuffle, signed-constant, random-mask",
    )


SETUPS: dict[str, str] = {}  # subcommand -> where its defaults come from (``list methods``)


def method_command(
    sub,
    name: str,
    help: str,
    module: str,
    spec_cls: str,
    experiment_cls: str,
    group: str | None = None,
    lottery: bool = False,
    prepare=None,
    vectorize: bool = False,
):
    """One experiment subcommand: its parser with the common flags (and the lottery's
    with ``lottery``), handled by running ``module.experiment_cls`` on a
    ``module.spec_cls`` built from the flags. Returns the argument group for the
    method's own flags. ``prepare(args)`` may turn flag text into spec values first."""
    setup = getattr(getattr(importlib.import_module(module), spec_cls), "SETUP", "")
    SETUPS[name] = setup
    p = sub.add_parser(
        name, help=help, description=f"{help}. Defaults: {setup}." if setup else help
    )
    common_flags(p)
    if lottery:
        lottery_flags(p)
    if vectorize:
        toggle(
            p,
            "--vectorize",
            "train the replicates (and the controls of a level) as one stack of copies, one "
            "forward and backward for all; falls back to one at a time, saying why, for "
            "BatchNorm or dropout",
        )
    handler = functools.partial(run_method, name, module, spec_cls, experiment_cls, prepare=prepare)
    p.set_defaults(handler=handler)
    return p.add_argument_group(group or name)


def run_method(
    method: str, module: str, spec_cls: str, experiment_cls: str, args, prepare=None
) -> int:
    """Build the spec of ``method`` from ``args`` and run its experiment."""
    mod = importlib.import_module(module)
    if prepare is not None:
        prepare(args)
    spec = spec_from_args(args, method, getattr(mod, spec_cls))
    return run_experiment(spec, getattr(mod, experiment_cls))


def experiment_for(parser: argparse.ArgumentParser, argv: list[str]):
    """The experiment that a subcommand's ``parser`` would run for ``argv`` (its flags),
    checked and bound to its run directory (data loaded, nothing written): what
    ``ticketlab sweep`` checks every point with."""
    args = parser.parse_args(argv)
    handler = args.handler
    if not isinstance(handler, functools.partial) or handler.func is not run_method:
        raise UsageError(f"'{argv[0]}' does not run an experiment")
    method, module, spec_cls, experiment_cls = handler.args
    mod = importlib.import_module(module)
    if handler.keywords.get("prepare") is not None:
        handler.keywords["prepare"](args)
    spec = spec_from_args(args, method, getattr(mod, spec_cls))
    return getattr(mod, experiment_cls)(spec)


def spec_from_args(args: argparse.Namespace, method: str, cls: type | None = None):
    """Preset, then ``--set`` values, then explicit flags, into a spec of class ``cls``."""
    from ..presets import preset
    from ..spec import Spec, coerce, spec_fields

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
    from ..distributed import is_writer
    from ..methods.lottery import LotteryExperiment
    from ..train import stop_on_signals

    exp = (experiment_cls or LotteryExperiment)(spec)  # validates, loads data: nothing written
    progress = None
    quiet = spec.quiet or not is_writer()  # under torchrun, rank 0 speaks for all
    if not quiet:
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
    if not quiet:
        # imported here: the report package loads matplotlib, a second of start-up
        from ..report.table import print_results

        print_results(rows, title=str(exp.dir))
    return 0


def print_table(title: str, columns, rows) -> None:
    """A rich table of string cells."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for c in columns:
        table.add_column(c)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
