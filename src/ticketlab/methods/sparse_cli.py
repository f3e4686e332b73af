"""Subcommands of sparse training from scratch: ``ticketlab dst`` (static, SET, RigL)."""

from __future__ import annotations

import argparse


def add_parsers(sub, common, lottery_flags) -> None:
    """Add ``dst`` to the subparsers ``sub`` of the ticketlab command line."""
    from .dst import ALGORITHMS, DISTRIBUTIONS

    p = sub.add_parser(
        "dst", help="dynamic sparse training from scratch: static, SET or RigL (Evci et al. 2020)"
    )
    common(p)
    g = p.add_argument_group("dynamic sparse training")
    g.add_argument("--algorithm", help=f"{', '.join(ALGORITHMS)} (default rigl)")
    target = g.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=float, help="fraction of weights removed, in (0, 1)")
    target.add_argument("--density", type=float, help="fraction of weights kept, in (0, 1)")
    g.add_argument(
        "--distribution",
        help=f"how the density is spread over layers: {', '.join(DISTRIBUTIONS)} (default erk)",
    )
    g.add_argument("--delta-t", type=int, help="steps between mask updates (default 100)")
    g.add_argument("--alpha", type=float, help="drop fraction, cosine-decayed for RigL (0.3)")
    g.add_argument(
        "--t-end", type=float, help="fraction of training after which the mask is fixed (0.75)"
    )
    g.add_argument(
        "--first-dense",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the first layer dense",
    )
    p.set_defaults(handler=run_dst)


def run_dst(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .dst import DSTExperiment, DSTSpec

    return run_experiment(spec_from_args(args, "dst", DSTSpec), DSTExperiment)
