"""Command-line front end: each subcommand builds a spec and calls the API.

The only package that knows argparse. One module per command group adds its
subcommands; each parser sets ``handler``, a function of the parsed args that
returns an exit code.

Exit codes: 0 done; 2 bad usage or bad spec (nothing written); 1 a failure at
run time; 130 interrupted (the same command resumes the run).
"""

from __future__ import annotations

import sys

from ..distributed import end_data_parallel
from ..errors import Diverged, RunInterrupted, UsageError
from . import analysis, export, lottery, masking, pruning, sparse, structured, sweep, wann
from .common import Parser, run_experiment, spec_from_args

EXIT_USAGE, EXIT_FAILURE, EXIT_INTERRUPTED = 2, 1, 130

# command groups in the order their subcommands are listed
GROUPS = (lottery, analysis, pruning, sparse, masking, structured, wann, export, sweep)


def build_parser() -> Parser:
    parser = Parser(prog="ticketlab", description="A laboratory for sparse neural networks.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for group in GROUPS:
        group.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        try:
            return args.handler(args)
        finally:
            end_data_parallel()
    except UsageError as exc:
        print(f"ticketlab: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (RunInterrupted, KeyboardInterrupt) as exc:
        reason = str(exc) or "interrupted"
        print(f"ticketlab: {reason}; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Diverged as exc:  # results so far are stored; the diverged row is marked
        print(f"ticketlab: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except Exception as exc:  # a failure at run time: one line, exit 1
        print(f"ticketlab: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


__all__ = ["build_parser", "main", "run_experiment", "spec_from_args"]

if __name__ == "__main__":
    sys.exit(main())
