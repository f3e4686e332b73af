"""``ticketlab wann``: weight-agnostic topology search with objective, novelty or combined
selection."""

from __future__ import annotations

import functools

from .common import SETUPS, Parser, run_method, toggle


def parse_floats(text: str) -> tuple[float, ...]:
    from ..errors import UsageError

    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise UsageError(f"expected a comma list of numbers; got {text!r}") from None


def add_parsers(sub) -> None:
    from ..evolve.tasks import TASKS
    from ..methods.wann import SELECTIONS, WannSpec

    help = "weight-agnostic topology search over shared weights (Gaier & Ha), novelty search"
    SETUPS["wann"] = WannSpec.SETUP
    p: Parser = sub.add_parser(
        "wann", help=help, description=f"{help}. Defaults: {WannSpec.SETUP}."
    )
    g = p.add_argument_group("search")
    g.add_argument("--task", help=f"one of {', '.join(TASKS)} (default xor)")
    g.add_argument("--population", type=int, help="networks per generation (default 64)")
    g.add_argument("--generations", type=int, help="generations (default 20; more extends a run)")
    g.add_argument(
        "--selection",
        help=f"{', '.join(SELECTIONS)}: Gaier & Ha's Pareto ranking, novelty alone, or Pareto "
        "over mean performance and novelty",
    )
    g.add_argument(
        "--weight-values",
        type=parse_floats,
        help="shared weights scored (default -2,-1,-.5,.5,1,2)",
    )
    g.add_argument("--init-density", type=float, help="initial input-output connection density")
    g.add_argument("--tournament-size", type=int)
    g.add_argument("--novelty-k", type=int, help="nearest neighbours for novelty (default 15)")
    g.add_argument("--archive-threshold", type=float, help="novelty needed to enter the archive")
    g.add_argument("--archive-size", type=int, help="archive bound; similar entries are forgotten")
    g.add_argument("--eval-examples", type=int, help="classification: examples per generation")
    g.add_argument("--episode-steps", type=int, help="swingup / maze: steps per episode")
    g.add_argument("--trials", type=int, help="swingup: episodes per weight value")
    toggle(g, "--tune-weight", "after the search, tune the single shared weight")
    toggle(g, "--train-weights", "after the search, train individual weights by gradient descent")
    g.add_argument("--train-steps", type=int, help="gradient steps for --train-weights")
    g.add_argument("--train-lr", type=float, help="Adam learning rate for --train-weights")
    e = p.add_argument_group("experiment")
    e.add_argument("--data-dir", help="where the dataset files are")
    e.add_argument("--seed", type=int)
    e.add_argument("--replicates", type=int, help="independent searches with distinct seeds")
    e.add_argument("--jobs", type=int, help="worker processes for the replicates")
    e.add_argument("--runs-dir", help="where run directories go (default: runs)")
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    e.add_argument("--quiet", action="store_true", default=None, help="no progress or table")
    handler = functools.partial(
        run_method, "wann", "ticketlab.methods.wann", "WannSpec", "WannExperiment"
    )
    p.set_defaults(handler=handler, preset=None)
