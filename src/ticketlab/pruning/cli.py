"""The ``ticketlab prune`` and ``ticketlab gradual`` subcommands."""

from __future__ import annotations

import argparse


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_parsers(sub, common, lottery_flags) -> None:
    """Add ``prune`` to the subparsers ``sub`` of the ticketlab command line."""
    from .allocation import ALLOCATIONS
    from .criteria import criterion_names

    p = sub.add_parser("prune", help="one-shot pruning (at init or after training), then training")
    common(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--criterion", help=f"score: {', '.join(criterion_names('prune'))}")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of weights removed, in (0, 1)")
    target.add_argument("--density", type=float, help="fraction of weights kept, in (0, 1)")
    g.add_argument(
        "--allocation",
        "--scope",
        "--distribution",
        dest="allocation",
        help=f"how the target is spread over layers: {', '.join(ALLOCATIONS)} (default global)",
    )
    g.add_argument(
        "--layer-density",
        type=_list,
        help="layers at a density of their own: comma list of NAME=D, NAME first, output "
        "or a layer name (e.g. first=0.8,output=0.5); the rest share the remaining target",
    )
    g.add_argument("--when", help="init (default) or trained")
    g.add_argument("--score-batches", type=int, help="minibatches the criterion sees")
    g.add_argument("--score-batch-size", type=int, help="their size (default: --batch-size)")
    g.add_argument(
        "--dense-layers", type=_list, help="layers kept dense: 'first', 'output' or names"
    )
    g.add_argument("--rewind", help="with --when trained: rewind step k of the dense run")
    g.add_argument("--protocol", help="with --when trained: rewind, finetune or lr-rewind")
    g.add_argument("--retrain-steps", help="retraining budget for finetune and lr-rewind")
    g.add_argument(
        "--controls",
        type=_list,
        help="sanity checks, each a variant trained alike: comma list of shuffle (mask "
        "permuted within layers), reinit (weights reinitialised), invert (lowest scores kept)",
    )
    p.set_defaults(handler=run_prune)

    from .criteria import criterion_names

    p = sub.add_parser(
        "gradual", help="gradual pruning during training (Zhu & Gupta 2017; movement pruning)"
    )
    common(p)
    g = p.add_argument_group("gradual pruning")
    g.add_argument(
        "--criterion", help=f"score: {', '.join(criterion_names('gradual'))} (default magnitude)"
    )
    target = g.add_mutually_exclusive_group()
    target.add_argument(
        "--final-sparsity",
        "--sparsity",
        dest="sparsity",
        type=float,
        help="final fraction removed s_f, in (0, 1)",
    )
    target.add_argument("--density", type=float, help="final fraction kept 1 - s_f, in (0, 1)")
    g.add_argument("--initial-sparsity", type=float, help="s_i at --start (default 0)")
    g.add_argument("--start", help="t0: first mask update, a step string (default 0it)")
    g.add_argument("--end", help="t0 + n dt: the step where s_f is reached")
    g.add_argument(
        "--every",
        "--frequency",
        dest="frequency",
        help="dt: steps between mask updates (default 100it)",
    )
    g.add_argument(
        "--allocation",
        "--scope",
        "--distribution",
        dest="allocation",
        help=f"how the target is spread over layers: {', '.join(ALLOCATIONS)} (default global)",
    )
    g.add_argument(
        "--dense-layers", type=_list, help="layers kept dense: 'first', 'output' or names"
    )
    p.set_defaults(handler=run_gradual)


def run_prune(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from ..methods.prune import PruneExperiment, PruneSpec

    return run_experiment(spec_from_args(args, "prune", PruneSpec), PruneExperiment)


def run_gradual(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from ..methods.gradual import GradualExperiment, GradualSpec

    return run_experiment(spec_from_args(args, "gradual", GradualSpec), GradualExperiment)
