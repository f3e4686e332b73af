"""Subcommands ``report``, ``compare``, ``stability`` and ``layer-reinit``.

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
