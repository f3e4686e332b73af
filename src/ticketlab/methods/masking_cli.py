"""Subcommands that learn masks or affine parameters over frozen weights.

``supermask``, ``bn-only``, ``supsup``, and ``adapt`` (FiLM vs SupSup vs fine-tuning).
"""

from __future__ import annotations

import argparse


def add_parsers(sub, common, lottery_flags) -> None:
    """Add the masking subcommands to the subparsers ``sub`` of the ticketlab command line."""
    from .supermask import ALGORITHMS, EVAL_MASKS, WEIGHT_KINDS

    p = sub.add_parser("supermask", help="train a mask over frozen weights (edge-popup, Zhou)")
    common(p)
    g = p.add_argument_group("supermask")
    g.add_argument("--algorithm", help=f"{', '.join(ALGORITHMS)} (default edge-popup)")
    g.add_argument(
        "--density",
        type=float,
        help="edge-popup: kept fraction per layer; bernoulli: initial keep probability",
    )
    g.add_argument("--weights-kind", help=f"frozen weights: {', '.join(WEIGHT_KINDS)}")
    g.add_argument(
        "--scale-fan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale the frozen weights by 1/sqrt(density) (edge-popup)",
    )
    g.add_argument(
        "--bn-affine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train BatchNorm scale and shift too (default: fixed at 1 and 0)",
    )
    g.add_argument("--eval-mask", help=f"bernoulli evaluation: {', '.join(EVAL_MASKS)}")
    g.add_argument(
        "--rescale",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="bernoulli: dynamic weight rescaling by the kept count per layer",
    )
    g.add_argument("--weights", help="a trained run directory: frozen weights from its level 0")
    p.set_defaults(handler=run_supermask)

    p = sub.add_parser("bn-only", help="train only BatchNorm scale and shift (Frankle et al.)")
    common(p)
    g = p.add_argument_group("bn-only")
    g.add_argument(
        "--train-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the output layer too",
    )
    g.add_argument("--gamma-threshold", type=float, help="|gamma| below this counts as off")
    g.add_argument(
        "--random-control",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also train as many randomly chosen parameters (default on)",
    )
    p.set_defaults(handler=run_bn_only)

    p = sub.add_parser("supsup", help="one supermask per task over one frozen network (SupSup)")
    common(p)
    g = p.add_argument_group("supsup")
    g.add_argument("--tasks", type=int, help="number of tasks (default 3)")
    g.add_argument("--task-kind", help="permuted (inputs permuted per task) or split (class pairs)")
    g.add_argument("--density", type=float, help="kept fraction per layer of each task's mask")
    g.add_argument("--weights-kind", help=f"frozen weights: {', '.join(WEIGHT_KINDS)}")
    g.add_argument(
        "--scale-fan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="scale the frozen weights by 1/sqrt(density)",
    )
    g.add_argument(
        "--inference-batch-size", type=int, help="test batch for one-shot task inference"
    )
    g.add_argument(
        "--inference-objective",
        help="one-shot task inference: entropy (default) or superfluous (the paper's G)",
    )
    g.add_argument(
        "--superfluous-neurons",
        type=int,
        help="extra output neurons that are never a label (needed by --inference-objective "
        "superfluous)",
    )
    p.set_defaults(handler=run_supsup)

    from .adapt import VARIANTS

    p = sub.add_parser(
        "adapt", help="adapt a trained network to new tasks: FiLM vs SupSup vs fine-tuning"
    )
    common(p)
    g = p.add_argument_group("adapt")
    g.add_argument("--weights", help="a trained run directory (train or lottery): its level 0")
    g.add_argument("--tasks", type=int, help="number of new tasks (default 1)")
    g.add_argument("--task-kind", help="permuted (inputs permuted per task) or split (class pairs)")
    g.add_argument(
        "--variants",
        type=_list,
        help=f"comma list of {', '.join(VARIANTS)} (default all)",
    )
    g.add_argument(
        "--train-output",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="film: train the output layer too (default: reuse it as trained)",
    )
    g.add_argument("--density", type=float, help="supsup: kept fraction per layer of each mask")
    p.set_defaults(handler=run_adapt)


def _list(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


def run_supermask(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .supermask import SupermaskExperiment, SupermaskSpec

    return run_experiment(spec_from_args(args, "supermask", SupermaskSpec), SupermaskExperiment)


def run_bn_only(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .bn_only import BnOnlyExperiment, BnOnlySpec

    return run_experiment(spec_from_args(args, "bn-only", BnOnlySpec), BnOnlyExperiment)


def run_supsup(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .supsup import SupsupExperiment, SupsupSpec

    return run_experiment(spec_from_args(args, "supsup", SupsupSpec), SupsupExperiment)


def run_adapt(args: argparse.Namespace) -> int:
    from ..cli import run_experiment, spec_from_args
    from .adapt import AdaptExperiment, AdaptSpec

    return run_experiment(spec_from_args(args, "adapt", AdaptSpec), AdaptExperiment)
