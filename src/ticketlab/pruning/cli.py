"""The ``ticketlab prune`` subcommand: one-shot pruning at init or after training."""

from __future__ import annotations

import argparse


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def add_parsers(sub, common, lottery_flags) -> None:
    """Add ``prune`` to the subparsers ``sub`` of the ticketlab command line."""
    from .allocation import ALLOCATIONS
    from .criteria import CRITERIA

    p = sub.add_parser("prune", help="one-shot pruning (at init or after training), then training")
    common(p)
    g = p.add_argument_group("pruning")
    g.add_argument("--criterion", help=f"score: {', '.join(CRITERIA)}")
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
    g.add_argument("--when", help="init (default) or trained")
    g.add_argument("--score-batches", type=int, help="minibatches the criterion sees")
    g.add_argument("--score-batch-size", type=int, help="their size (default: --batch-size)")
    g.add_argument(
        "--dense-layers", type=_list, help="layers kept dense: 'first', 'output' or names"
    )
    g.add_argument("--rewind", help="with --when trained: rewind step k of the dense run")
    g.add_argument("--protocol", help="with --when trained: rewind, finetune or lr-rewind")
    g.add_argument("--retrain-steps", help="retraining budget for finetune and lr-rewind")
    p.set_defaults(handler=run_prune)


def run_prune(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from ..methods.prune import PruneExperiment, PruneSpec

    return run_experiment(spec_from_args(args, "prune", PruneSpec), PruneExperiment)
