"""Subcommands ``report``, ``compare``, ``stability``, ``fisher``, ``dissect`` and
``layer-reinit``.

Each parser sets ``handler``, a function of the parsed args returning an exit
code; bad input raises :class:`UsageError` before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from .common import common_flags, lottery_flags, parse_ints, parse_list, print_table


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "report", help="figures and a self-contained report.html for runs or a sweep file"
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories or SWEEP.toml")
    p.add_argument("--out", required=True, help="directory for the PNGs and report.html")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_report)

    p = sub.add_parser("compare", help="overlap of masks across levels, replicates and runs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--out", help="directory for compare.csv and the heat-map (default: none)")
    p.add_argument("--level", type=int, help="compare only masks of this level")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_compare)

    p = sub.add_parser(
        "stability", help="instability along linear paths between copies (Frankle et al. 2020)"
    )
    common_flags(p)
    lottery_flags(p)
    g = p.add_argument_group("stability")
    g.add_argument(
        "--rewind-points",
        type=parse_list,
        help="rewind steps k to fork at: '0it,100it'; with the rewind protocol these replace "
        "--rewind (each k tests the masks of IMP rewound to k)",
    )
    g.add_argument(
        "--stability-levels",
        type=parse_ints,
        help="lottery levels to test: '0,3' (0 = dense); level L at k uses the mask of the "
        "lottery run with --rewind k, run or reused in --runs-dir",
    )
    g.add_argument("--path-points", type=int, help="points on the linear path (default 30)")
    g.add_argument(
        "--bn-batches", type=int, help="training batches to recompute BatchNorm stats at each point"
    )
    p.set_defaults(handler=cmd_stability)

    p = sub.add_parser(
        "fisher",
        help="trace of the Fisher information at each saved step (Achille et al. 2019)",
        description="Trace of the Fisher information, E_x E_{y~p(y|x)} ||grad log p(y|x)||^2,"
        " at every step a run saved with --save-every, for the dense level and each ticket,"
        " in total and per layer; writes fisher.csv into each run directory. Early-bird and"
        " stability runs given too mark their draw step and rewind points in the figure.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--examples", type=int, default=1000, help="training inputs (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="picks the inputs and the sampled labels")
    p.add_argument(
        "--exact",
        action="store_true",
        help="average over every class weighted by p(y|x) instead of one sampled label",
    )
    p.add_argument("--out", help="directory for fisher.png (default: none)")
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_fisher)

    p = sub.add_parser(
        "dissect",
        help="class-selective and concept-detecting units per level (Frankle & Bau 2019)",
        description="For every level's trained network: each unit's class selectivity index"
        " (Morcos et al. 2018) and, for conv units, the IoU of its top-quantile activation map"
        " with concept masks (network dissection); writes dissect.csv (per level and layer)"
        " and dissect_units.csv (per unit) into each run directory.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--examples", type=int, default=1000, help="test images (default 1000)")
    p.add_argument(
        "--concepts",
        metavar="DIR",
        help="a concept folder: DIR/images/<id>.png|.npy and DIR/masks/<concept>/<id>.png|.npy "
        "(default: object, background and the four halves, derived from the test images)",
    )
    p.add_argument(
        "--selectivity-threshold",
        type=float,
        default=0.5,
        help="class selectivity index from which a unit is a class detector (default 0.5)",
    )
    p.add_argument(
        "--quantile",
        type=float,
        default=0.005,
        help="fraction of a unit's activations above its threshold T_k (default 0.005)",
    )
    p.add_argument(
        "--iou-threshold", type=float, default=0.04, help="IoU of a concept detector (0.04)"
    )
    p.add_argument(
        "--object-threshold",
        type=float,
        default=0.2,
        help="raw intensity (0..1) above which a pixel is object, not background (0.2)",
    )
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_dissect)

    p = sub.add_parser("layer-reinit", help="re-initialise one layer at a time (Zhang et al. 2019)")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--level", type=int, default=0, help="lottery level whose ticket is used")
    p.add_argument("--variant", default="ticket")
    p.add_argument("--out", required=True, help="directory for layer_reinit.csv and figures")
    p.add_argument("--data-dir")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(handler=cmd_layer_reinit)


def cmd_report(args: argparse.Namespace) -> int:
    from ..report import build_report

    points = None
    dirs = args.run_dirs
    if len(dirs) == 1 and str(dirs[0]).endswith(".toml"):  # a sweep: its points' runs
        from .sweep import sweep_runs

        dirs, points = sweep_runs(dirs[0])
    page = build_report(dirs, args.out, points=points)
    if not args.quiet:
        print(f"report: {page}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from ..analysis import compare_runs

    rows = compare_runs(args.run_dirs, args.out, level=args.level)
    if not args.quiet:
        print_table(
            "mask overlap (all layers)",
            ("a", "b", "jaccard", "hamming"),
            [
                (r["a"], r["b"], f"{r['jaccard']:.3f}", f"{r['hamming']:.3f}")
                for r in rows
                if r["layer"] == "all"
            ],
        )
    return 0


def cmd_stability(args: argparse.Namespace) -> int:
    from ..methods.stability import StabilitySpec, run_stability
    from .common import spec_from_args

    spec = spec_from_args(args, "stability", StabilitySpec)
    rows = run_stability(spec)
    if not spec.quiet:
        for r in rows:
            print(
                f"replicate {r['replicate']} level {r['level']} ({100 * r['density']:.1f}%)"
                f" k={r['rewind_step']}: instability {100 * r['instability']:.2f} pp",
                file=sys.stdout,
            )
    return 0


def cmd_layer_reinit(args: argparse.Namespace) -> int:
    from ..analysis import layer_reinit_runs

    rows = layer_reinit_runs(
        args.run_dirs, args.out, level=args.level, variant=args.variant, data_dir=args.data_dir
    )
    if not args.quiet:
        print_table(
            f"test accuracy with one layer reset ({args.out})",
            ("run", "layer", "reset to", "test acc %"),
            [(r["run"], r["layer"], r["reset"], f"{100 * r['test_accuracy']:.2f}") for r in rows],
        )
    return 0


def cmd_fisher(args: argparse.Namespace) -> int:
    from ..fisher import fisher_runs

    results = fisher_runs(
        args.run_dirs, examples=args.examples, seed=args.seed, exact=args.exact,
        data_dir=args.data_dir,
    )  # fmt: skip
    if args.out:
        from ..report import fisher_figure

        png = fisher_figure(args.run_dirs, args.out)
        if not args.quiet:
            print(f"figure: {png}")
    if not args.quiet:
        for run, rows in results.items():
            print_table(
                f"{run}/fisher.csv: trace of the Fisher information",
                ("replicate", "level", "variant", "weights %", "step", "trace"),
                [
                    (str(r["replicate"]), str(r["level"]), r["variant"],
                     f"{100 * r['density']:.1f}", str(r["step"]), f"{r['trace']:.4g}")
                    for r in rows
                    if r["layer"] == "all"
                ],
            )  # fmt: skip
    return 0


def cmd_dissect(args: argparse.Namespace) -> int:
    from ..dissect import dissect_runs

    results = dissect_runs(
        args.run_dirs,
        examples=args.examples,
        concepts_dir=args.concepts,
        selectivity_threshold=args.selectivity_threshold,
        quantile=args.quantile,
        iou_threshold=args.iou_threshold,
        object_threshold=args.object_threshold,
        data_dir=args.data_dir,
    )
    if not args.quiet:
        for run, rows in results.items():
            print_table(
                f"{run}/dissect.csv: interpretable units per layer",
                ("rep", "level", "weights %", "test acc %", "layer", "units", "class det.",
                 "concept det.", "interpretable", "concepts"),
                [
                    (str(r["replicate"]), str(r["level"]), f"{100 * r['density']:.1f}",
                     f"{100 * float(r['test_accuracy']):.2f}" if r["test_accuracy"] else "",
                     r["layer"], str(r["units"]), str(r["class_detectors"]),
                     str(r["concept_detectors"]), str(r["interpretable"]), str(r["concepts"]))
                    for r in rows
                ],
            )  # fmt: skip
    return 0
