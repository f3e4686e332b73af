"""Where work runs: in this process, or in worker processes on this machine.

:func:`run_parallel` runs independent items (an experiment's replicates) in
``jobs`` worker processes of the standard library's process pool. Workers are
forked, so they share the parent's in-memory datasets (copy-on-write, no copy
per worker) and need nothing pickled but the item. Each worker sets its thread
count so that jobs x threads <= the usable cores.

Workers never write ``results.csv`` or take the run lock: what a worker would
write it reports (:func:`report_results`), and the parent, which holds the lock,
writes it. Their progress bars are drawn by the parent in one live table
(:class:`ProgressProxy`). Ctrl-C or SIGTERM in the parent asks every worker once
(SIGTERM) to checkpoint and stop; workers ignore SIGINT themselves, so a
terminal's Ctrl-C reaching the whole process group is not a second signal.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import torch

from .errors import RunInterrupted, UsageError
from .runs import write_csv

# set in the parent before the pool forks, read by the workers
_JOB: tuple | None = None
_QUEUE = None  # the worker's channel to the parent; None in the parent


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def threads_per_worker(jobs: int) -> int:
    return max(1, usable_cores() // max(1, jobs))


def in_worker() -> bool:
    return _QUEUE is not None


def report_results(path: Path, rows: list[dict], columns: list[str]) -> bool:
    """In a worker, send a ``results.csv`` to the parent and return True; else False."""
    if _QUEUE is None:
        return False
    _QUEUE.put(("results", str(path), time.time(), rows, list(columns)))
    return True


class ProgressProxy:
    """Stands in for a ``rich`` Progress in a worker: tasks are drawn by the parent."""

    def __init__(self, queue):
        self.queue = queue
        self.count = 0

    def add_task(self, description, total=None, completed=0, **kwargs):
        self.count += 1
        key = (os.getpid(), self.count)
        self.queue.put(("add", key, description, total, completed, kwargs))
        return key

    def update(self, task, **kwargs):
        self.queue.put(("update", task, kwargs))


def _worker(item):
    fn, threads, with_progress = _JOB
    torch.set_num_threads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent forwards one SIGTERM
    from .train import stop_on_signals

    with stop_on_signals():
        return fn(item, ProgressProxy(_QUEUE) if with_progress else None)


def _init_worker(queue) -> None:
    global _QUEUE
    _QUEUE = queue


def _drain(queue, progress, stop: threading.Event) -> None:
    """The parent's side: draw the workers' progress and write their results files."""
    tasks: dict = {}
    newest: dict[str, float] = {}
    while not (stop.is_set() and queue.empty()):
        try:
            msg = queue.get(timeout=0.1)
        except Exception:  # queue.Empty (or a closed queue at shutdown)
            continue
        kind = msg[0]
        if kind == "results":
            _, path, stamp, rows, columns = msg
            if stamp >= newest.get(path, 0.0):  # the latest collection holds every row
                newest[path] = stamp
                write_csv(path, rows, columns)
        elif progress is None:
            continue
        elif kind == "add":
            _, key, description, total, completed, kwargs = msg
            tasks[key] = progress.add_task(description, total=total, completed=completed, **kwargs)
        elif kind == "update" and msg[1] in tasks:
            progress.update(tasks[msg[1]], **msg[2])


class WorkerPool:
    """``jobs`` forked worker processes running ``fn(item, progress)`` for submitted items.

    The workers fork at the first :meth:`submit` and inherit the parent's memory as it
    is then (datasets, models, the experiment). :meth:`collect` waits for everything
    submitted and returns ``({item: fn's return value}, {item: exception})``, the
    second for the items that failed (a killed worker's item fails with
    :class:`BrokenProcessPool`). A stop request (Ctrl-C, SIGTERM) in the parent is
    forwarded once to every worker, which checkpoints; then :class:`RunInterrupted`
    is raised.
    """

    def __init__(self, fn: Callable, jobs: int, progress=None, threads: int | None = None):
        if "fork" not in mp.get_all_start_methods():
            raise UsageError("--jobs needs worker processes started by fork (Linux)")
        self.fn, self.jobs, self.progress = fn, jobs, progress
        self.threads = threads or threads_per_worker(jobs)
        self.ctx = mp.get_context("fork")
        self.queue = self.ctx.Queue()
        self.stop = threading.Event()
        self.drawer = threading.Thread(
            target=_drain, args=(self.queue, progress, self.stop), daemon=True
        )
        self.pool: ProcessPoolExecutor | None = None
        self.futures: dict = {}

    def submit(self, item) -> None:
        global _JOB
        if self.pool is None:
            _JOB = (self.fn, self.threads, self.progress is not None)
            self.pool = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=self.ctx,
                initializer=_init_worker,
                initargs=(self.queue,),
            )
        self.futures[self.pool.submit(_worker, item)] = item
        if not self.drawer.is_alive():
            self.drawer.start()  # after the fork: the workers start single-threaded

    def collect(self) -> tuple[dict, dict]:
        from .train import stop_requested

        results: dict = {}
        failed: dict = {}
        interrupted = False
        pending = set(self.futures)
        while pending:
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for f in done:
                exc = f.exception()
                if isinstance(exc, RunInterrupted):
                    interrupted = True
                elif exc is not None:
                    failed[self.futures[f]] = exc
                else:
                    results[self.futures[f]] = f.result()
            if stop_requested() and not interrupted:
                interrupted = True
                for p in list(getattr(self.pool, "_processes", {}).values()):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGTERM)
        self.futures = {}
        if interrupted:
            raise RunInterrupted("interrupted; every worker wrote a checkpoint")
        return results, failed

    def close(self) -> None:
        global _JOB
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
        _JOB = None
        self.stop.set()
        if self.drawer.is_alive():
            self.drawer.join(timeout=10)

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_parallel(items: list, fn: Callable, jobs: int, progress=None) -> tuple[dict, dict]:
    """Run ``fn(item, progress)`` for every item in ``jobs`` worker processes
    (:class:`WorkerPool`); ``({item: result}, {item: exception})``."""
    with WorkerPool(fn, jobs, progress) as pool:
        for item in items:
            pool.submit(item)
        return pool.collect()


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, BrokenProcessPool):
        return "its worker process died (killed, or out of memory)"
    return f"{type(exc).__name__}: {exc}"


__all__ = [
    "ProgressProxy",
    "WorkerPool",
    "describe_failure",
    "in_worker",
    "report_results",
    "run_parallel",
    "threads_per_worker",
    "usable_cores",
]
