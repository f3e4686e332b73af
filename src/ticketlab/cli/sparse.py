"""Sparse training: ``ticketlab dst`` (static, SET, RigL), ``dnw`` (Discovering Neural
Wirings, Wortsman et al. 2019), ``early-bird`` (You et al. 2020) and ``noise`` (sparse
weights and k-winners under input noise, Ahmad & Scheinkman 2019)."""

from __future__ import annotations

from .common import method_command, target_flags, toggle


def _noise_scales(args) -> None:
    from ..methods.noise import parse_scales

    if args.noise is not None:
        args.noise = parse_scales(args.noise)


def add_parsers(sub) -> None:
    from ..methods.dst import ALGORITHMS, DISTRIBUTIONS, DROP_SCHEDULES

    g = method_command(
        sub,
        "dst",
        "dynamic sparse training from scratch: static, SET or RigL (Evci et al. 2020)",
        "ticketlab.methods.dst",
        "DSTSpec",
        "DSTExperiment",
        group="dynamic sparse training",
    )
    g.add_argument("--algorithm", help=f"{', '.join(ALGORITHMS)} (default rigl)")
    target_flags(g)
    g.add_argument(
        "--distribution",
        help=f"how the density is spread over layers: {', '.join(DISTRIBUTIONS)} (default erk)",
    )
    g.add_argument("--delta-t", type=int, help="steps between mask updates (default 100)")
    g.add_argument("--alpha", type=float, help="drop fraction alpha (0.3)")
    g.add_argument(
        "--drop-schedule",
        help=f"how the drop fraction changes until T_end: {', '.join(DROP_SCHEDULES)} "
        "(default: constant for set, as in Mocanu et al.; cosine for rigl)",
    )
    g.add_argument(
        "--t-end", type=float, help="fraction of training after which the mask is fixed (0.75)"
    )
    toggle(g, "--first-dense", "keep the first layer dense")

    g = method_command(
        sub,
        "dnw",
        "discovering neural wirings: train weights and wiring at once, top-k edges by |w| "
        "forward, every weight updated (Wortsman et al. 2019)",
        "ticketlab.methods.dnw",
        "DNWSpec",
        "DNWExperiment",
        group="neural wirings",
    )
    target_flags(g, "edges of each wired layer")
    g.add_argument(
        "--layers",
        help="which layers are wired: all (default) or pointwise (1x1 convs only, as the "
        "paper does for MobileNetV1)",
    )

    # --levels etc.: the lottery pipeline the FLOPs are compared with
    g = method_command(
        sub,
        "early-bird",
        "early-bird tickets: draw a channel mask during training, then retrain (You 2020)",
        "ticketlab.methods.early_bird",
        "EarlyBirdSpec",
        "EarlyBirdExperiment",
        lottery=True,
    )
    g.add_argument("--ratio", type=float, help="pruning ratio p of channels/weights (0.5)")
    g.add_argument("--l1", type=float, help="L1 strength s on the BN scales (1e-4)")
    g.add_argument("--retrain-from", help="draw or init: what the ticket starts from (draw)")
    g.add_argument(
        "--retrain",
        help="continue (the rest of the budget from the draw, LR schedule and L1 on the BN "
        "scales kept, as the reference) or restart (the full budget again, schedule "
        "restarted, no L1) (continue)",
    )
    g.add_argument("--mask-kind", help="channel (structured) or weight (unstructured)")
    g.add_argument("--keep", type=int, help="masks in the FIFO (5)")
    g.add_argument("--distance", type=float, help="draw when all distances are <= this (0.1)")

    g = method_command(
        sub,
        "noise",
        "noise robustness of dense, sparse and sparse + k-winners networks (Ahmad 2019)",
        "ticketlab.methods.noise",
        "NoiseSpec",
        "NoiseExperiment",
        group="noise robustness",
        prepare=_noise_scales,
    )
    g.add_argument("--density", type=float, help="fraction of weights kept, in (0, 1) (0.5)")
    g.add_argument(
        "--distribution", help="how the density is spread over layers: uniform, er or erk (uniform)"
    )
    g.add_argument(
        "--weight-sparsity",
        help="per-unit (the paper: every unit keeps the same number of inputs) or per-layer "
        "(round(d n) weights anywhere in a layer) (per-unit)",
    )
    g.add_argument("--kwinners", type=float, help="fraction k/n of units kept (0.25)")
    g.add_argument("--kwinners-inference", type=float, help="factor on k at evaluation (1.5)")
    g.add_argument("--boost-strength", type=float, help="k-winners boost strength beta (1.5)")
    g.add_argument("--boost-decay", type=float, help="factor on beta after each epoch (0.9)")
    g.add_argument(
        "--duty-cycles", help="conv k-winners duty cycles per channel (the paper) or unit (channel)"
    )
    g.add_argument(
        "--noise-kind",
        help="pixels (the paper: a fraction of input pixels set to the mean + 2 std) or "
        "gaussian (added, scaled by the inputs' std) (pixels)",
    )
    g.add_argument(
        "--noise",
        help="noise levels, comma-separated: fractions of pixels, or Gaussian scales "
        "(0,0.05,...,0.5)",
    )
