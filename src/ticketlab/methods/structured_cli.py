"""The ``ticketlab structured`` subcommand: remove whole units, then fine-tune or
train the smaller network from scratch (Liu et al. 2019)."""

from __future__ import annotations

import argparse


def add_parsers(sub, common, lottery_flags) -> None:
    """Add ``structured`` to the subparsers ``sub`` of the ticketlab command line."""
    from .structured import STRUCTURED_CRITERIA

    p = sub.add_parser(
        "structured",
        help="remove neurons/channels for a really smaller network; fine-tune or train "
        "from scratch (Liu et al. 2019)",
    )
    common(p)
    g = p.add_argument_group("structured pruning")
    g.add_argument(
        "--criterion",
        dest="unit_criterion",
        help=f"unit score: {', '.join(STRUCTURED_CRITERIA)} (default l1)",
    )
    target = g.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of units removed, in (0, 1)")
    target.add_argument("--density", type=float, help="fraction of units kept, in (0, 1)")
    g.add_argument(
        "--allocation",
        dest="unit_allocation",
        help="layerwise (same fraction per layer) or global (one threshold); "
        "default global for bn-scale, else layerwise",
    )
    g.add_argument(
        "--slimming-l1",
        type=float,
        help="L1 strength on BN scales while training the dense net (1e-4 with bn-scale)",
    )
    g.add_argument(
        "--residual",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ResNets: also prune the residual stream, one shared channel mask per stage",
    )
    g.add_argument(
        "--from-scratch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train the pruned architecture from a fresh init: Scratch-E and Scratch-B",
    )
    g.add_argument("--scratch-b-cap", type=float, help="Scratch-B budget cap, x T (2)")
    g.add_argument("--retrain-steps", help="fine-tuning budget (default: the training budget)")
    g.add_argument(
        "--finetune-lr",
        type=float,
        help="fine-tuning LR (default: the schedule's final LR, at least 1/100 of --lr)",
    )
    g.add_argument("--score-examples", type=int, help="examples for 'redundancy' (1000)")
    p.set_defaults(handler=run_structured)


def run_structured(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .structured import StructuredExperiment, StructuredSpec

    spec = spec_from_args(args, "structured", StructuredSpec)
    return run_experiment(spec, StructuredExperiment)
