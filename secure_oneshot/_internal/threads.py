"""CPU threads of the long commands (train, distill, demo, experiment, audit-privacy).

Two settings, both measured on this project's shared 2-core VM under load:

* ``OMP_WAIT_POLICY=PASSIVE``: idle OpenMP workers sleep instead of spinning.  With the default
  (active) policy, each of torch's parallel regions waits for workers that share the cores with
  other processes; an inversion step took 2.0-5.7 s with 2 threads against 0.5-0.7 s with 1, and
  the passive policy more than halved the step time.  OpenMP reads the variable once, when the
  library loads -- that is, when ``torch`` is first imported -- so :func:`prefer_passive_openmp`
  must run before that: the long commands' CLI modules call it before their first import of
  anything that imports torch.  An explicit ``OMP_WAIT_POLICY`` in the environment is kept.  The
  device is not known yet at that point (it is parsed later, and asking torch would load it), so
  GPU runs get it too; there it only affects the few CPU-side parallel regions.
* ``--threads N`` (:func:`apply_threads`): torch's intra-op and inter-op thread counts.  The default
  is the number of CPUs this process may run on (``os.sched_getaffinity``: a container's or
  ``taskset``'s limit, not the host's core count).

This module imports nothing heavy: it runs before torch is loaded.
"""

from __future__ import annotations

import argparse
import os

from ..errors import ConfigError

__all__ = ["add_threads_option", "apply_threads", "available_cpus", "prefer_passive_openmp"]


def prefer_passive_openmp() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment already says otherwise (call before importing torch)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:   # no affinity call on this platform (macOS, Windows)
        return max(1, os.cpu_count() or 1)


def apply_threads(threads: int | None) -> int:
    """Set torch's intra-op and inter-op threads to ``threads`` (``None``: :func:`available_cpus`); returns it.

    Raises:
        ConfigError: ``threads`` below 1.
    """
    if threads is None:
        threads = available_cpus()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be an integer >= 1, got {threads!r}",
                          hint=f"this process may run on {available_cpus()} CPUs; omit --threads to use them all")
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:   # settable once per process, before any inter-op work: a second command in-process keeps the first
        pass
    return threads


def add_threads_option(parser: argparse.ArgumentParser, note: str = "") -> None:
    """``--threads N`` on a long command (``note``: what else the command does with N)."""
    parser.add_argument("--threads", type=int, metavar="N",
                        help=f"CPU threads for torch (default: the CPUs this process may use, here {available_cpus()}); "
                             f"on a shared or loaded machine 1 is often fastest{note}")
