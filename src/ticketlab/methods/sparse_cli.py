"""Subcommands of sparse training: ``ticketlab dst`` (static, SET, RigL), ``ticketlab
early-bird`` (You et al. 2020) and ``ticketlab noise`` (sparse weights and k-winners
under input noise, Ahmad & Scheinkman 2019)."""

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
    _add_early_bird(sub, common, lottery_flags)
    _add_noise(sub, common)


def _add_early_bird(sub, common, lottery_flags) -> None:
    p = sub.add_parser(
        "early-bird",
        help="early-bird tickets: draw a channel mask during training, then retrain (You 2020)",
    )
    common(p)
    lottery_flags(p)  # --levels etc.: the lottery pipeline the FLOPs are compared with
    g = p.add_argument_group("early-bird")
    g.add_argument("--ratio", type=float, help="pruning ratio p of channels/weights (0.5)")
    g.add_argument("--l1", type=float, help="L1 strength s on the BN scales (1e-4)")
    g.add_argument("--retrain-from", help="draw or init: what the ticket starts from (draw)")
    g.add_argument("--mask-kind", help="channel (structured) or weight (unstructured)")
    g.add_argument("--keep", type=int, help="masks in the FIFO (5)")
    g.add_argument("--distance", type=float, help="draw when all distances are <= this (0.1)")
    p.set_defaults(handler=run_early_bird)


def _add_noise(sub, common) -> None:
    p = sub.add_parser(
        "noise",
        help="noise robustness of dense, sparse and sparse + k-winners networks (Ahmad 2019)",
    )
    common(p)
    g = p.add_argument_group("noise robustness")
    g.add_argument("--density", type=float, help="fraction of weights kept, in (0, 1) (0.5)")
    g.add_argument("--distribution", help="uniform, er or erk (default erk)")
    g.add_argument("--kwinners", type=float, help="fraction k/n of units kept (0.25)")
    g.add_argument("--kwinners-inference", type=float, help="factor on k at evaluation (1.5)")
    g.add_argument("--boost-strength", type=float, help="k-winners boost strength beta (1.5)")
    g.add_argument("--boost-decay", type=float, help="factor on beta after each epoch (0.9)")
    g.add_argument("--noise", help="Gaussian noise scales, comma-separated (0,0.1,0.2,0.4,0.8)")
    p.set_defaults(handler=run_noise)


def run_dst(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .dst import DSTExperiment, DSTSpec

    return run_experiment(spec_from_args(args, "dst", DSTSpec), DSTExperiment)


def run_early_bird(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .early_bird import EarlyBirdExperiment, EarlyBirdSpec

    return run_experiment(spec_from_args(args, "early-bird", EarlyBirdSpec), EarlyBirdExperiment)


def run_noise(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .noise import NoiseExperiment, NoiseSpec, parse_scales

    if args.noise is not None:
        args.noise = parse_scales(args.noise)
    return run_experiment(spec_from_args(args, "noise", NoiseSpec), NoiseExperiment)
