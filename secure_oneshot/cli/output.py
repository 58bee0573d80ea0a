"""One result object per command, rendered either for people or as JSON."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Result", "byte_size", "progress_bar"]


@dataclass
class Result:
    """``data`` is the JSON form; ``lines`` the human form of the same facts."""

    data: dict[str, Any]
    lines: list[str] = field(default_factory=list)
    exit_code: int = 0  # non-zero for a completed run that still has something to report (ingest: some quarantined)

    def print(self, as_json: bool) -> None:
        if as_json:
            print(json.dumps({"ok": True, **self.data}, indent=2, sort_keys=True))
        else:
            print("\n".join(self.lines))


def byte_size(n: int) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def progress_bar(description: str, total: int) -> AbstractContextManager[Callable[[int], None] | None]:
    """A rich progress bar on stderr when it is a terminal and the work is big; otherwise nothing."""
    if not sys.stderr.isatty() or total < (64 << 20):
        return nullcontext(None)
    return _RichBar(description, total)


class _RichBar(AbstractContextManager):  # type: ignore[type-arg]
    def __init__(self, description: str, total: int) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

        self._progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True)
        self._task = self._progress.add_task(description, total=total)

    def __enter__(self) -> Callable[[int], None]:
        self._progress.start()
        return lambda n: self._progress.advance(self._task, n)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
