"""Worker tasks for tests/test_demo_parallel.py: module-level (the spawned workers import them by name) and light
(this module imports no torch, so a worker starts in about a second)."""

from __future__ import annotations

import os
import time

from secure_oneshot.errors import DataError


def fails_with_data_error(job: dict) -> dict:
    raise DataError(f"site {job['site']}: no records", hint="check the partition")


def sleeps(job: dict) -> dict:
    time.sleep(job["seconds"])
    return {"pid": os.getpid()}


def returns_a_tuple(job: dict) -> dict:
    return {"pair": (1, 2)}


def exits_at_once(job: dict) -> dict:
    os._exit(9)   # what the kernel's out-of-memory kill looks like to the pool
