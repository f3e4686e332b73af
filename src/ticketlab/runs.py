"""The run store: one directory per spec hash, atomic writes, a lock, results.csv.

Every file is written to a temporary name in the same directory and renamed,
so a crash leaves either the old file or the new one. Tensors are safetensors,
metadata JSON; nothing is unpickled from disk.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import socket
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ._version import __version__
from .errors import DataError, UsageError

RESULT_COLUMNS = [
    "method",
    "replicate",
    "level",
    "variant",
    "density",
    "density_all",
    "compression_ratio",
    "flops_speedup",
    "effective_density",
    "test_accuracy",
    "test_loss",
    "test_accuracy_at_best_val",
    "val_accuracy",
    "val_loss",
    "best_val_step",
    "train_loss",
    "train_accuracy",
    "steps",
    "train_seconds",
    "status",
]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary file name beside ``path``; rename it over ``path`` on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.write(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | os.PathLike):
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is corrupt (not valid JSON: {exc})") from None


def write_csv(path: str | os.PathLike, rows: list[dict], columns: list[str]) -> None:
    extra = sorted({k for r in rows for k in r} - set(columns))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns + extra, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock file holding ``host pid``.

    A lock whose process is gone (same host, pid not alive) is stale and is
    taken over; a live one makes the second process refuse.
    """

    def __init__(self, directory: Path):
        self.path = Path(directory) / "lock"
        self.held = False

    def acquire(self) -> None:
        me = f"{socket.gethostname()} {os.getpid()}"
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    host, pid = self.path.read_text().split()
                    pid = int(pid)
                except (FileNotFoundError, ValueError):
                    host, pid = socket.gethostname(), -1
                if host == socket.gethostname() and (pid <= 0 or not _pid_alive(pid)):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.path)  # stale: its process is gone
                    continue
                raise UsageError(
                    f"run {self.path.parent} is locked by process {pid} on {host}; "
                    f"if that process is gone, delete {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self.held = True
            return
        raise UsageError(f"could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            self.held = False

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


def write_spec(
    run_dir: str | os.PathLike, identity: dict, hash: str, spec: dict, steps_per_epoch: int
) -> None:
    """``spec.json``: the run's identity and hash, its resolved spec and the package version."""
    write_json(
        Path(run_dir) / "spec.json",
        {
            "identity": identity,
            "hash": hash,
            "spec": spec,
            "steps_per_epoch": steps_per_epoch,
            "version": __version__,
        },
    )


def diff_specs(stored: dict, current: dict) -> list[str]:
    keys = sorted(set(stored) | set(current))
    return [
        f"{k}: stored {stored.get(k)!r}, now {current.get(k)!r}"
        for k in keys
        if stored.get(k) != current.get(k)
    ]


def open_run(
    runs_dir: str | os.PathLike,
    method: str,
    digest: str,
    identity: dict,
    resolved: dict,
    not_hashed=frozenset(),
) -> Path:
    """The run directory for a spec; refuse if a stored spec means something else.

    Both the hashed identity and every resolved field must agree, so a changed
    default never silently changes a run's meaning. A field the stored spec does
    not have (a knob added later) is not compared.
    """
    directory = Path(runs_dir) / f"{method}-{digest}"
    spec_path = directory / "spec.json"
    if spec_path.exists():
        stored_all = read_json(spec_path)
        stored = stored_all.get("identity", {})
        diff = diff_specs(stored, identity)
        old = stored_all.get("spec", {})
        diff += [
            f"{k}: stored {old[k]!r}, now {v!r}"
            for k, v in resolved.items()
            if k in old and k not in not_hashed and k not in identity and old[k] != v
        ]
        if diff:
            raise UsageError(
                f"run {directory} holds a different experiment ({'; '.join(diff)}); "
                "use another --runs-dir"
            )
    return directory


def save_state(path: str | os.PathLike, state: dict[str, torch.Tensor]) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, tmp)


def load_state(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as exc:
        raise DataError(f"weights file {path} is corrupt: {exc}") from None
