"""Independent jobs in worker processes of one torch thread each (``concurrent.futures`` with the ``spawn`` start method).

On a small machine two processes of one thread each use two cores better than one process of two threads: torch's
thread pools wait on each other, and collapse when another process takes a core.  :func:`run_jobs` runs a
module-level function once per job in up to ``workers`` such processes.

What crosses the process boundary is plain values only (the job and result dicts of :data:`Plain` values, checked
before sending): never a model, tensor or dataset, so a worker builds what it needs from paths and numbers and writes
its own outputs (atomically).  An expected failure in a worker (a :class:`SecureOneshotError`) comes back as the same
error class with its message and hint, so the caller's command ends with its one-line error and exit code; the other
workers are stopped then, as on Ctrl-C (workers ignore SIGINT: the parent alone decides, and terminates them).  A
worker killed from outside (memory) is a :class:`ResourceError`.

This module imports nothing heavy; torch is loaded in the workers, by the job function's module.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Union

from .. import errors
from ..errors import ResourceError, SecureOneshotError
from .threads import apply_threads

__all__ = ["Plain", "Task", "run_jobs", "check_plain"]

Plain = Union[None, bool, int, float, str, list["Plain"], dict[str, "Plain"]]
"""A value that may cross the process boundary (what JSON holds)."""
Task = Callable[[dict[str, Plain]], dict[str, Plain]]
"""A module-level function from a job's plain values to a result's."""

_STOP_SECONDS = 10.0   # a terminated worker gets this long to exit before it is killed


def check_plain(value: Any, where: str = "job") -> None:
    """Refuse anything but :data:`Plain` values (a tuple, path or tensor is a caller bug: ``TypeError``)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: key {key!r} is not a string")
            check_plain(item, f"{where}.{key}")
        return
    raise TypeError(f"{where} is a {type(value).__name__}; only plain values (str, numbers, lists, dicts) cross processes")


def _start_worker() -> None:
    # The parent handles Ctrl-C (the terminal sends it to every process of the group) and stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ["OMP_NUM_THREADS"] = "1"   # before the task's module loads torch (if it does)


def _run_one(task: Task, job: dict[str, Plain]) -> dict[str, Plain]:
    if "torch" in sys.modules:   # the task's module is imported by now; a task without torch starts without it
        apply_threads(1)
    try:
        result = task(job)
    except SecureOneshotError as e:   # sent back as plain values, rebuilt as the same class (_rebuild_error)
        known = [cls.__name__ for cls in type(e).__mro__ if getattr(errors, cls.__name__, None) is cls]
        try:
            check_plain(e.data)
            data = e.data
        except TypeError:   # facts that are not plain values stay behind; the message and hint carry the meaning
            data = {}
        return {"error": {"classes": known, "message": e.message, "hint": e.hint, "details": list(e.details), "data": data}}
    check_plain(result, "result")
    return {"result": result}


def _rebuild_error(sent: dict[str, Any]) -> SecureOneshotError:
    cls = next((getattr(errors, name) for name in sent["classes"] if name in errors.__all__), SecureOneshotError)
    return cls(sent["message"], sent["hint"], details=sent["details"], data=sent["data"])


def run_jobs(jobs: list[tuple[Task, dict[str, Plain]]], workers: int,
             on_done: Callable[[int, dict[str, Plain]], None] | None = None) -> list[dict[str, Plain]]:
    """``task(job)`` for every ``(task, job)`` in up to ``workers`` processes of one torch thread; results in job order.

    Each ``task`` must be a module-level function (the workers import it by name).  ``on_done(index, result)`` runs
    in this process as each job finishes, in completion order.  Jobs start in list order: put the longest first.

    Raises:
        SecureOneshotError: the first failing job's error (same class, message and hint); the others are stopped.
        ResourceError: a worker process died (killed for memory, say).
    """
    for i, (_, job) in enumerate(jobs):
        check_plain(job, f"job {i}")
    before = set(multiprocessing.active_children())
    pool = ProcessPoolExecutor(max_workers=max(1, min(workers, len(jobs))), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_start_worker)
    results: list[dict[str, Plain] | None] = [None] * len(jobs)
    try:
        futures = {pool.submit(_run_one, task, job): i for i, (task, job) in enumerate(jobs)}
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except BrokenProcessPool as e:
                raise ResourceError("a worker process died before finishing its job (killed for memory?)",
                                    hint="run again with --threads 1 (one process, the jobs one after another)") from e
            if "error" in outcome:
                raise _rebuild_error(outcome["error"])  # type: ignore[arg-type]
            index = futures[future]
            results[index] = outcome["result"]  # type: ignore[assignment]
            if on_done is not None:
                on_done(index, results[index])  # type: ignore[arg-type]
    except BaseException:
        # Workers first, then the pool, waiting for its manager thread: that thread also reaps workers, and a worker
        # it is reaping still counts as alive until it has recorded the exit status (shutting the pool down without
        # waiting first left one worker "started" in 2 runs of 20, measured).  With the workers gone it ends at once.
        _stop(set(multiprocessing.active_children()) - before)
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results  # type: ignore[return-value]


def _stop(processes: set[multiprocessing.process.BaseProcess]) -> None:
    """Terminate this pool's workers (SIGTERM, then SIGKILL after a grace period): no orphan keeps training.

    A worker killed while writing leaves at most an atomic-write temporary, never a partial final file; the next
    write to that path sweeps it (``_internal.atomic``)."""
    for process in processes:
        process.terminate()
    for process in processes:
        process.join(_STOP_SECONDS)
        if process.is_alive():
            process.kill()
            process.join()
