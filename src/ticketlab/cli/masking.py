"""Subcommands that learn masks or affine parameters over frozen weights:
``supermask``, ``bn-only``, ``supsup``, and ``adapt`` (FiLM vs SupSup vs fine-tuning);
and, beside SupSup, the other continual learner, ``clnp`` (frozen units, pruning)."""

from __future__ import annotations

from .common import method_command, parse_list, toggle


def add_parsers(sub) -> None:
    from ..methods.adapt import VARIANTS
    from ..methods.supermask import ALGORITHMS, EVAL_MASKS, WEIGHT_KINDS

    g = method_command(
        sub,
        "supermask",
        "train a mask over frozen weights (edge-popup, Zhou)",
        "ticketlab.methods.supermask",
        "SupermaskSpec",
        "SupermaskExperiment",
    )
    g.add_argument("--algorithm", help=f"{', '.join(ALGORITHMS)} (default edge-popup)")
    g.add_argument(
        "--density",
        type=float,
        help="edge-popup: kept fraction per layer; bernoulli: initial keep probability",
    )
    g.add_argument("--weights-kind", help=f"frozen weights: {', '.join(WEIGHT_KINDS)}")
    toggle(g, "--scale-fan", "scale the frozen weights by 1/sqrt(density) (edge-popup)")
    toggle(g, "--bn-affine", "train BatchNorm scale and shift too (default: fixed at 1 and 0)")
    g.add_argument(
        "--eval-mask",
        help=f"bernoulli evaluation, one of {', '.join(EVAL_MASKS)}: sampled (default) scores "
        "one binary mask drawn with a seeded generator, threshold keeps sigmoid(s) > 0.5, "
        "expected multiplies by sigmoid(s) (a soft mask, not a supermask)",
    )
    toggle(g, "--rescale", "bernoulli: dynamic weight rescaling by the kept count per layer")
    g.add_argument("--weights", help="a trained run directory: frozen weights from its level 0")

    g = method_command(
        sub,
        "bn-only",
        "train only BatchNorm scale and shift (Frankle et al.)",
        "ticketlab.methods.bn_only",
        "BnOnlySpec",
        "BnOnlyExperiment",
    )
    toggle(g, "--train-output", "train the output layer too")
    g.add_argument("--gamma-threshold", type=float, help="|gamma| below this counts as off")
    toggle(g, "--random-control", "also train as many randomly chosen parameters (default on)")

    g = method_command(
        sub,
        "supsup",
        "one supermask per task over one frozen network (SupSup)",
        "ticketlab.methods.supsup",
        "SupsupSpec",
        "SupsupExperiment",
    )
    g.add_argument("--tasks", type=int, help="number of tasks (default 3)")
    g.add_argument("--task-kind", help="permuted (inputs permuted per task) or split (class pairs)")
    g.add_argument("--density", type=float, help="kept fraction per layer of each task's mask")
    g.add_argument("--weights-kind", help=f"frozen weights: {', '.join(WEIGHT_KINDS)}")
    toggle(g, "--scale-fan", "scale the frozen weights by 1/sqrt(density)")
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
    g.add_argument(
        "--inference-examples",
        help="one-shot task inference over: batch (default: the test batch's mean) or first "
        "(its first example only, as the reference configs do)",
    )
    g.add_argument(
        "--store",
        help="explicit (default: each mask kept as it is) or hopfield (also stored as an "
        "attractor of one fixed-size Hopfield network per layer and read back from it "
        "without the task id: rows of variant hopfield)",
    )
    g.add_argument("--hopfield-gamma", type=float, help="weight of the Hopfield energy (1.5e-3)")
    g.add_argument("--hopfield-lr", type=float, help="SGD rate of the recovery (500)")
    g.add_argument("--hopfield-batch-size", type=int, help="test batch of the recovery (64)")

    g = method_command(
        sub,
        "clnp",
        "continual learning by neural pruning: tasks on the units earlier tasks left free",
        "ticketlab.methods.clnp",
        "ClnpSpec",
        "ClnpExperiment",
    )
    g.add_argument("--tasks", type=int, help="number of tasks (default 3)")
    g.add_argument("--task-kind", help="permuted (inputs permuted per task) or split (class pairs)")
    g.add_argument("--l1", type=float, help="L1 penalty on the trained weights (default 1e-4)")
    g.add_argument(
        "--margin",
        type=float,
        help="graceful forgetting: validation accuracy the pruning of a task may cost "
        "(default 0.01)",
    )
    g.add_argument(
        "--baseline",
        help="finetune: plain sequential fine-tuning of every weight instead (a head per task)",
    )

    g = method_command(
        sub,
        "adapt",
        "adapt a trained network to new tasks: FiLM vs SupSup vs fine-tuning",
        "ticketlab.methods.adapt",
        "AdaptSpec",
        "AdaptExperiment",
    )
    g.add_argument("--weights", help="a trained run directory (train or lottery): its level 0")
    g.add_argument("--tasks", type=int, help="number of new tasks (default 1)")
    g.add_argument("--task-kind", help="permuted (inputs permuted per task) or split (class pairs)")
    g.add_argument(
        "--variants",
        type=parse_list,
        help=f"comma list of {', '.join(VARIANTS)} (default all)",
    )
    toggle(g, "--train-output", "film: train the output layer too (default: reuse it as trained)")
    g.add_argument("--density", type=float, help="supsup: kept fraction per layer of each mask")
