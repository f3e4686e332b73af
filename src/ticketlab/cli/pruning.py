"""``ticketlab prune`` (one-shot, at init or after training) and ``gradual``."""

from __future__ import annotations

from .common import method_command, parse_list, target_flags


def _allocation(g, default: str) -> None:
    from ..pruning.allocation import ALLOCATIONS

    g.add_argument(
        "--allocation",
        "--scope",
        "--distribution",
        dest="allocation",
        help=f"how the target is spread over layers: {', '.join(ALLOCATIONS)} (default {default})",
    )


def _dense_layers(g) -> None:
    g.add_argument(
        "--dense-layers", type=parse_list, help="layers kept dense: 'first', 'output' or names"
    )


def add_parsers(sub) -> None:
    from ..pruning.criteria import criterion_names

    g = method_command(
        sub,
        "prune",
        "one-shot pruning (at init or after training), then training",
        "ticketlab.methods.prune",
        "PruneSpec",
        "PruneExperiment",
        group="pruning",
    )
    g.add_argument("--criterion", help=f"score: {', '.join(criterion_names('prune'))}")
    target_flags(g)
    _allocation(g, "global")
    g.add_argument(
        "--layer-density",
        type=parse_list,
        help="layers at a density of their own: comma list of NAME=D, NAME first, output "
        "or a layer name (e.g. first=0.8,output=0.5); the rest share the remaining target",
    )
    g.add_argument("--when", help="init (default) or trained")
    g.add_argument("--score-batches", type=int, help="minibatches the criterion sees")
    g.add_argument("--score-batch-size", type=int, help="their size (default: --batch-size)")
    _dense_layers(g)
    g.add_argument("--rewind", help="with --when trained: rewind step k of the dense run")
    g.add_argument("--protocol", help="with --when trained: rewind, finetune or lr-rewind")
    g.add_argument("--retrain-steps", help="retraining budget for finetune and lr-rewind")
    g.add_argument(
        "--controls",
        type=parse_list,
        help="sanity checks, each a variant trained alike: comma list of shuffle (mask "
        "permuted within layers), reinit (weights reinitialised), invert (lowest scores kept)",
    )

    g = method_command(
        sub,
        "gradual",
        "gradual pruning during training (Zhu & Gupta 2017; movement pruning)",
        "ticketlab.methods.gradual",
        "GradualSpec",
        "GradualExperiment",
        group="gradual pruning",
    )
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
    g.add_argument(
        "--end",
        help="t0 + n dt: the step where s_f is reached "
        "(default: the last update step in the first 3/4 of training)",
    )
    g.add_argument(
        "--every",
        "--frequency",
        dest="frequency",
        help="dt: steps between mask updates (default 100it)",
    )
    _allocation(g, "layerwise: every layer to s_t, as Zhu & Gupta and Sanh et al.")
    _dense_layers(g)
