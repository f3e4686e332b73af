"""``ticketlab structured``: remove whole units, then fine-tune or train the smaller
network from scratch (Liu et al. 2019); ``ticketlab lowrank``: replace each layer by a
truncated SVD, then fine-tune or train from scratch."""

from __future__ import annotations

from .common import method_command, parse_list, target_flags, toggle


def add_parsers(sub) -> None:
    from ..methods.structured import STRUCTURED_CRITERIA

    g = method_command(
        sub,
        "structured",
        "remove neurons/channels for a really smaller network; fine-tune or train "
        "from scratch (Liu et al. 2019)",
        "ticketlab.methods.structured",
        "StructuredSpec",
        "StructuredExperiment",
        group="structured pruning",
    )
    g.add_argument(
        "--criterion",
        dest="unit_criterion",
        help=f"unit score: {', '.join(STRUCTURED_CRITERIA)} (default l1)",
    )
    target_flags(g, "units")
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
    toggle(
        g,
        "--residual",
        "ResNets: also prune the residual stream, one shared channel mask per stage",
    )
    toggle(
        g,
        "--from-scratch",
        "also train the pruned architecture from a fresh init: Scratch-E and Scratch-B",
    )
    g.add_argument("--scratch-b-cap", type=float, help="Scratch-B budget cap, x T (2)")
    g.add_argument("--retrain-steps", help="fine-tuning budget (default: the training budget)")
    g.add_argument(
        "--finetune-lr",
        type=float,
        help="fine-tuning LR (default: the schedule's final LR, at least 1/100 of --lr)",
    )
    g.add_argument("--score-examples", type=int, help="examples for 'redundancy' (1000)")

    g = method_command(
        sub,
        "lowrank",
        "replace each Linear and conv weight by a rank-r product (truncated SVD of the "
        "trained weights), then fine-tune; or train the factorised network from scratch",
        "ticketlab.methods.lowrank",
        "LowRankSpec",
        "LowRankExperiment",
        group="low-rank replacement",
    )
    g.add_argument(
        "--rank-fraction",
        type=float,
        help="rank kept in each layer, as a fraction of min(out, fan-in), in (0, 1]",
    )
    toggle(
        g,
        "--from-scratch",
        "train the factorised network from initialisation instead of from the SVD",
    )
    g.add_argument(
        "--dense-layers",
        type=parse_list,
        help="layers left unfactorised: 'first', 'output' or names",
    )
    g.add_argument("--retrain-steps", help="fine-tuning budget (default: the training budget)")
    g.add_argument(
        "--finetune-lr",
        type=float,
        help="fine-tuning LR (default: the schedule's final LR, at least 1/100 of --lr)",
    )
