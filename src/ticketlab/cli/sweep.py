"""``ticketlab sweep SWEEP.toml``: a grid of ordinary runs, in worker processes or on Ray.

The file names a command, its fixed flags, a grid (every combination is one
point) and optionally extra ``[[points]]``; each point is exactly the single
command with those flags, so it lands in the same run directory (same hash) and
resumes the same way. ``[resources]`` gives ``cpus`` and ``gpus`` per point
for Ray. Every point is checked (flags, values, data) before anything runs.

Where points run: ``--executor local`` (worker processes of the standard process
pool on this machine, ``--jobs`` at a time) or ``--executor ray`` (one Ray task
per point, on ``--address`` or on a local Ray started for the sweep). The
sweep's own record, ``<runs-dir>/sweep-<hash>.json``, says which points
finished: a second sweep skips them, and runs the others, which resume.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import UsageError
from .common import SETUPS, experiment_for, print_table

EXECUTORS = ("local", "ray")
_PARSERS: dict = {}  # subcommand -> its parser, to check points with


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "sweep", help="a grid of ordinary runs from a TOML file, in worker processes or on Ray"
    )
    p.add_argument("file", help="the sweep file (TOML): command, [flags], [grid], [[points]]")
    p.add_argument("--executor", default="local", help=f"{', '.join(EXECUTORS)} (default local)")
    p.add_argument("--address", help="a Ray cluster's address (default: a local Ray)")
    p.add_argument("--jobs", type=int, default=1, help="points at a time, local executor (1)")
    p.add_argument("--dry-run", action="store_true", help="list the points and which are done")
    p.set_defaults(handler=cmd_sweep)
    _PARSERS.update(sub.choices)  # a live view: the other groups' commands too


# the file --------------------------------------------------------------------------------


def _flag(key: str, value) -> list[str]:
    name = "--" + str(key).replace("_", "-")
    if isinstance(value, bool):
        return [name] if value else ["--no-" + name[2:]]
    if isinstance(value, list):
        return [name, ",".join(str(v) for v in value)]
    return [name, str(value)]


def load_sweep(path: str) -> dict:
    """The sweep file as ``{command, flags, points: [{flag: value}], resources}``."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"sweep file {path} does not exist")
    try:
        doc = tomllib.loads(p.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"sweep file {path} is not valid TOML: {exc}") from None
    unknown = sorted(set(doc) - {"command", "flags", "grid", "points", "resources"})
    if unknown:
        raise UsageError(
            f"sweep file {path}: unknown table(s) {', '.join(unknown)}; "
            "choose from: command, flags, grid, points, resources"
        )
    command = doc.get("command")
    if command not in SETUPS:
        raise UsageError(
            f"sweep file {path}: command {command!r} is not one that runs experiments; "
            f"choose from: {', '.join(sorted(SETUPS))}"
        )
    flags, grid = doc.get("flags", {}), doc.get("grid", {})
    if not isinstance(flags, dict) or not isinstance(grid, dict):
        raise UsageError(f"sweep file {path}: [flags] and [grid] must be tables")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise UsageError(f"sweep file {path}: grid.{key} must be a non-empty list")
    keys = list(grid)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    if not grid:
        points = []
    extra = doc.get("points", [])
    if not isinstance(extra, list) or not all(isinstance(x, dict) for x in extra):
        raise UsageError(f"sweep file {path}: [[points]] must be a list of tables")
    points += extra
    if not points:
        points = [{}]
    resources = doc.get("resources", {})
    bad = sorted(set(resources) - {"cpus", "gpus"})
    if bad:
        raise UsageError(f"sweep file {path}: unknown resource(s) {', '.join(bad)}: cpus, gpus")
    return {"command": command, "flags": flags, "points": points, "resources": resources}


def point_argv(sweep: dict, point: dict) -> list[str]:
    argv = [sweep["command"]]
    for key, value in {**sweep["flags"], **point}.items():
        argv += _flag(key, value)
    return argv


def point_label(point: dict) -> str:
    """A point named by what differs from the fixed flags: ``criterion=snip, sparsity=0.98``."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(the fixed flags)"


def _record_path(runs_dir: Path, sweep: dict) -> Path:
    text = json.dumps([sweep["command"], sweep["flags"], sweep["points"]], sort_keys=True)
    return runs_dir / f"sweep-{hashlib.sha256(text.encode()).hexdigest()[:12]}.json"


# running a point -------------------------------------------------------------------------


def run_point(argv: list[str], threads: int | None = None) -> tuple[int, str]:
    """One point, as the single command in its own process: its exit code and the last
    line it printed on stderr (the reason, when it failed)."""
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.run(
        [sys.executable, "-m", "ticketlab.cli", *argv, "--quiet"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    rc = proc.returncode if proc.returncode >= 0 else 1  # killed by a signal
    return rc, (lines[-1] if lines else f"exit {proc.returncode}")


def _local(argvs: dict, jobs: int) -> dict:
    """Points in ``jobs`` worker processes at a time, each with cores/jobs threads."""
    from ..executors import threads_per_worker

    threads = threads_per_worker(jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {i: pool.submit(run_point, a, threads) for i, a in argvs.items()}
        return {i: f.result() for i, f in futures.items()}


def _ray(argvs: dict, resources: dict, address: str | None) -> dict:
    try:
        import ray
    except ImportError:
        raise UsageError(
            "--executor ray needs Ray: pip install 'ticketlab[ray]' (or use --executor local)"
        ) from None
    ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    cpus = resources.get("cpus", 1)
    task = ray.remote(num_cpus=cpus, num_gpus=resources.get("gpus", 0), max_retries=0)(run_point)
    refs = {i: task.remote(a, max(1, int(cpus))) for i, a in argvs.items()}
    out = {}
    for i, ref in refs.items():
        try:
            out[i] = ray.get(ref)
        except Exception as exc:  # a worker that died, or an error Ray raised
            out[i] = (1, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
    return out


def sweep_runs(path: str) -> tuple[list[Path], list[dict]]:
    """The run directories of a sweep file's points, and the points: for ``report``."""
    sweep = load_sweep(path)
    dirs = []
    for point in sweep["points"]:
        argv = point_argv(sweep, point)
        d = experiment_for(_PARSERS[argv[0]], argv[1:]).dir
        if not (d / "results.csv").exists():
            raise UsageError(
                f"point {point_label(point)} has no results yet ({d}): run "
                f"'ticketlab sweep {path}' first"
            )
        dirs.append(d)
    return dirs, sweep["points"]


# the command -----------------------------------------------------------------------------


def _accuracy(run_dir: Path) -> str:
    """Mean test accuracy of the deepest level's first variant, for the sweep table."""
    from ..runs import read_csv

    path = run_dir / "results.csv"
    if not path.exists():
        return ""
    rows = [r for r in read_csv(path) if r.get("status") == "done"]
    if not rows:
        return ""
    level = max(int(r["level"]) for r in rows)
    last = [r for r in rows if int(r["level"]) == level]
    first = last[0]["variant"]
    acc = [float(r["test_accuracy"]) for r in last if r["variant"] == first]
    return f"{100 * sum(acc) / len(acc):.2f} ({first})"


def cmd_sweep(args) -> int:
    from ..runs import atomic_path, read_json

    if args.executor not in EXECUTORS:
        raise UsageError(f"unknown executor '{args.executor}'; choose from: {', '.join(EXECUTORS)}")
    if args.jobs < 1:
        raise UsageError(f"--jobs must be >= 1; got {args.jobs}")
    sweep = load_sweep(args.file)
    argvs = {i: point_argv(sweep, p) for i, p in enumerate(sweep["points"])}
    dirs = {}
    for i, argv in argvs.items():  # every point checked before anything runs
        try:
            dirs[i] = experiment_for(_PARSERS[argv[0]], argv[1:]).dir
        except UsageError as exc:
            raise UsageError(f"point {point_label(sweep['points'][i])}: {exc}") from None
    runs_dirs = {d.parent for d in dirs.values()}
    record_path = _record_path(sorted(runs_dirs)[0], sweep)
    record = read_json(record_path) if record_path.exists() else {}
    done = {i for i in argvs if record.get(str(dirs[i].name)) == "done"}
    labels = {i: point_label(p) for i, p in enumerate(sweep["points"])}
    if args.dry_run:
        rows = [
            [
                labels[i],
                "done" if i in done else "started" if dirs[i].exists() else "to run",
                str(dirs[i]),
            ]
            for i in argvs
        ]
        print_table(f"{args.file}: {len(argvs)} points", ["point", "status", "run"], rows)
        return 0
    todo = {i: a for i, a in argvs.items() if i not in done}

    def save() -> None:
        record_path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(record_path) as tmp:
            Path(tmp).write_text(json.dumps(record, indent=1, sort_keys=True))

    if args.executor == "ray":
        results = _ray(todo, sweep["resources"], args.address)
    else:
        results = _local(todo, args.jobs)
    for i, (rc, _) in results.items():
        record[dirs[i].name] = "done" if rc == 0 else f"failed ({rc})"
    save()
    rows, failed = [], 0
    for i in argvs:
        if i in done:
            status = "done (skipped)"
        else:
            rc, msg = results[i]
            status = "done" if rc == 0 else f"failed: {msg}"
            failed += rc != 0
        rows.append([labels[i], status, _accuracy(dirs[i]), str(dirs[i])])
    print_table(f"{args.file}: {len(argvs)} points", ["point", "status", "test acc %", "run"], rows)
    return 1 if failed else 0


__all__ = [
    "EXECUTORS",
    "add_parsers",
    "load_sweep",
    "point_argv",
    "point_label",
    "run_point",
    "sweep_runs",
]
