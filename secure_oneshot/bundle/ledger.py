"""The server's replay ledger: bundle ids accepted once are refused forever after.

SQLite from the standard library: the PRIMARY KEY makes check-and-record one
atomic statement, so two processes opening the same bundle cannot both accept it,
and SQLite's journal keeps the file consistent across crashes.

The database is always opened through a ``file:`` URI built from the absolute
path with every special character percent-encoded, so a path containing ``?``,
``#`` or ``%`` names that file and can never smuggle in URI parameters such as
``mode=memory`` (which would silently turn off the replay check).
"""

from __future__ import annotations

import os
import sqlite3
from datetime import datetime
from pathlib import Path

from .._internal.encoding import format_time, utc_now
from ..errors import ReplayError, ResourceError

__all__ = ["ReplayLedger", "ledger_uri"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS accepted_bundles (
    bundle_id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    created TEXT NOT NULL,
    payload_sha256 TEXT NOT NULL,
    accepted_at TEXT NOT NULL
)
"""


def ledger_uri(path: str | os.PathLike[str], mode: str) -> str:
    """The SQLite URI that opens exactly the file at ``path`` with ``mode`` (``ro`` or ``rwc``).

    ``Path.as_uri`` percent-encodes everything but unreserved characters and
    ``/``, so ``?``, ``#``, ``%`` and spaces stay part of the file name.

    >>> ledger_uri("/srv/a?mode=memory#x", "ro")
    'file:///srv/a%3Fmode%3Dmemory%23x?mode=ro'
    """
    return f"{Path(os.path.abspath(path)).as_uri()}?mode={mode}"


class ReplayLedger:
    """A persistent set of accepted bundle ids.

    >>> import tempfile
    >>> ledger = ReplayLedger(tempfile.mkdtemp() + "/ledger.db")
    >>> ledger.contains("00" * 16)
    False
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._db = sqlite3.connect(ledger_uri(self.path, "rwc"), uri=True, isolation_level=None)
            self._db.execute(_SCHEMA)
        except (sqlite3.Error, ValueError) as e:
            raise ResourceError(f"cannot open replay ledger {path}: {e}", hint="check the path is writable") from e

    @classmethod
    def read_only(cls, path: str | os.PathLike[str]) -> ReplayLedger:
        """Open an existing ledger without ever writing (a missing file is an empty ledger)."""
        ledger = cls.__new__(cls)
        ledger.path = os.fspath(path)
        exists = os.path.exists(ledger.path)
        try:
            # An empty private in-memory database stands in for a ledger file that does not exist yet.
            ledger._db = sqlite3.connect(ledger_uri(ledger.path, "ro") if exists else ":memory:", uri=exists)
            if not exists:
                ledger._db.execute(_SCHEMA)
            ledger._db.execute("SELECT 1 FROM accepted_bundles LIMIT 1")  # not a ledger: fail here, not mid-verify
        except (sqlite3.Error, ValueError) as e:
            raise ResourceError(f"cannot read replay ledger {path}: {e}", hint="check --ledger names the server's ledger file") from e
        return ledger

    def contains(self, bundle_id: str) -> bool:
        row = self._db.execute("SELECT 1 FROM accepted_bundles WHERE bundle_id = ?", (bundle_id,)).fetchone()
        return row is not None

    def _refuse(self, bundle_id: str) -> ReplayError:
        (accepted_at,) = self._db.execute(
            "SELECT accepted_at FROM accepted_bundles WHERE bundle_id = ?", (bundle_id,)
        ).fetchone()
        return ReplayError(f"bundle {bundle_id} was already accepted on {accepted_at} (replay)")

    def check(self, bundle_id: str) -> None:
        """Raise :class:`ReplayError` if ``bundle_id`` was accepted before."""
        if self.contains(bundle_id):
            raise self._refuse(bundle_id)

    def record(self, bundle_id: str, sender: str, created: str, payload_sha256: str, now: datetime | None = None) -> None:
        """Atomically check and record ``bundle_id`` as accepted.

        Raises:
            ReplayError: it was already there (a concurrent or earlier acceptance).
        """
        try:
            self._db.execute(
                "INSERT INTO accepted_bundles VALUES (?, ?, ?, ?, ?)",
                (bundle_id, sender, created, payload_sha256, format_time(now or utc_now())),
            )
        except sqlite3.IntegrityError as e:
            raise self._refuse(bundle_id) from e

    def close(self) -> None:
        self._db.close()
