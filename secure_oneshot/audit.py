"""Append-only, hash-chained, signed audit log (JSON Lines), format ``secure-oneshot-audit/v1``.

Every action that sends (or refuses to send) data from a site, and every server
ingest decision, appends one record (DESIGN.md invariant 7).  This module writes
records (:func:`append_event`), reads them (:func:`read_log`, :func:`head`) and
checks a whole log against its writer's public identity (:func:`verify_log`).
It does not decide *what* to record (the commands that act do), does not rotate
or compress logs, and does not keep secrets: a record names key ids, never
private keys or passphrases.  POSIX only (``fcntl.flock``).

>>> import tempfile, os
>>> site = Identity.generate("site-a")
>>> log = os.path.join(tempfile.mkdtemp(), "audit.jsonl")
>>> append_event(log, site, AuditEvent("export", "refused", reason="no policy")).seq
0
>>> [r.event.outcome for r in verify_log(log, site.public)]
['refused']

Format
======

A log is a file of ASCII text, one record per line, every line terminated by a
single ``\\n`` (0x0A).  There is no header; an empty file is a log of zero
records.  Line ``n`` (1-based) holds the record whose ``seq`` is ``n - 1``.

Each line is the canonical JSON of one object: keys sorted by code point, no
insignificant whitespace, non-ASCII escaped as lowercase ``\\uXXXX``, no
floating-point numbers (reals travel as decimal strings), integers within
+/-(2^53-1), no duplicate keys (``_internal/encoding.canonical_json``, which is
Python's ``json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=True)``).  The object has exactly these fields:

==================  =========================================================
``format``          ``"secure-oneshot-audit/v1"``
``seq``             integer: 0 for the first record, +1 for each next one
``time``            UTC time of writing, ``YYYY-MM-DDTHH:MM:SSZ``
``actor``           key id of the writing identity (32 lowercase hex digits)
``actor_name``      that identity's name (informational; the key id counts)
``action``          what happened: ``[a-z][a-z-]*``, at most 64 characters,
                    e.g. ``export``, ``ingest``, ``policy-sign``
``outcome``         ``"ok"``, ``"refused"`` or ``"error"``
``reason``          one human-readable line (no control characters), or ``""``
``bundle_id``       string, ``""`` when there is no bundle
``payload_sha256``  64 lowercase hex digits, or ``""``
``policy_id``       string, or ``""``
``policy_version``  non-negative integer, or ``null``
``policy_sha256``   64 lowercase hex digits, or ``""``
``recipients``      array of key ids (may be empty)
``dp``              object: the DP record (no floats; decimal strings)
``details``         object: anything else (no floats)
``version``         the ``secure_oneshot.__version__`` that wrote the record
``prev``            lowercase hex SHA-256 of the previous line's bytes
                    (without its ``\\n``); 64 ``0`` characters for ``seq`` 0
``sig``             base64 (RFC 4648 section 4, padded) of the 64-byte Ed25519
                    signature described below
==================  =========================================================

The *hash* of a record is the lowercase hex SHA-256 of its line's bytes without
the ``\\n``.  The signature is made by the writing identity's Ed25519 key over
``b"secure-oneshot/v1 audit record\\x00" + canonical_json(R)``, where ``R`` is
the record object without the ``sig`` field.  A line longer than
:data:`MAX_LINE_BYTES` is invalid.

Verification
============

:func:`verify_log` reads the log line by line against the writer's public
identity and stops at the first failure, naming its 1-based line number and
``seq``.  For each line it checks, in order:

1. the line ends with ``\\n`` (otherwise: a partial last line from a crash or a
   truncation);
2. it parses as JSON without duplicate keys or NaN, and re-serialising it gives
   the same bytes (a non-canonical line counts as tampered);
3. it has exactly the fields above, with the types above and ``format`` equal
   to ``"secure-oneshot-audit/v1"``;
4. ``seq`` equals the line number minus one (a deleted, inserted, duplicated or
   reordered record breaks this);
5. ``prev`` equals the hash of the previous line;
6. ``actor`` equals the signer's key id (a record inserted by another
   identity breaks this, even if it is validly signed by that identity);
7. the signature verifies under the signer's Ed25519 key (an edited field
   breaks this).

**Limitation: deleting the newest records is not detectable from the log
alone.**  A log cut after any complete line is a valid, shorter log.  To catch
that, write down :func:`head` (the record count and the last hash, also
``secure-oneshot audit head``) somewhere the log's writer cannot change, and
later pass it as ``verify_log(..., expect_head=(count, hash))``: verification
then also fails unless record ``count - 1`` still has that hash.  Likewise a
holder of the writer's private key can rewrite the whole log; only a head kept
elsewhere detects that.

Concurrency and crashes
=======================

Appends take an exclusive ``fcntl.flock`` on the sidecar file ``<log>.lock``
around "read the last line, build and sign the record, ``os.write`` the whole
line with ``O_APPEND``, ``os.fsync``", so appends from several processes never
interleave or fork the chain.  Readers take a shared lock on the same file when
it exists, so they never see half a line of a live append.  A log whose last
byte is not ``\\n`` (a crash mid-append) is never appended to: the append fails
with :class:`~secure_oneshot.errors.AuditLogError` until someone has looked at
it.  A failed write is truncated away before the error is raised.  A log has a
single writing identity: appending with another identity is refused.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import __version__
from ._internal.atomic import fsync_dir
from ._internal.encoding import b64decode, b64encode, canonical_json, format_time, parse_strict_json, parse_time, utc_now
from .errors import AuditLogError, ResourceError
from .keys.identity import Identity, PublicIdentity, check_key_id

__all__ = [
    "AUDIT_FORMAT",
    "OUTCOMES",
    "GENESIS_PREV",
    "MAX_LINE_BYTES",
    "AuditEvent",
    "AuditRecord",
    "append_event",
    "encode_record",
    "signing_message",
    "read_log",
    "verify_log",
    "head",
]

AUDIT_FORMAT = "secure-oneshot-audit/v1"
SIGNATURE_LABEL = b"secure-oneshot/v1 audit record\x00"
OUTCOMES = ("ok", "refused", "error")
GENESIS_PREV = "0" * 64
MAX_LINE_BYTES = 1 << 20
MAX_JSON_DEPTH = 33
"""Deepest nesting in a record line: the record object plus ``dp``/``details`` up to 32 deep."""
LOG_MODE = 0o640

_TAIL_BLOCK = 1 << 16
_ACTION_RE = re.compile(r"[a-z][a-z-]{0,63}")
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
# Everything str.splitlines() splits on, plus the other C0/C1 controls: a reason
# is shown in a terminal table, where a newline could forge a row and ESC could
# rewrite the screen.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SEQ_HINT_RE = re.compile(rb'"seq":(\d{1,16})[,}]')
_RECORD_FIELDS = frozenset({
    "format", "seq", "time", "actor", "actor_name", "action", "outcome", "reason", "bundle_id",
    "payload_sha256", "policy_id", "policy_version", "policy_sha256", "recipients", "dp", "details",
    "version", "prev", "sig",
})
_PARTIAL_HINT = (
    "nothing more is appended after a partial line; run `secure-oneshot audit verify LOG --signer FILE.pub`, "
    "keep a copy, and have the log repaired by hand"
)
_TAMPER_HINT = "keep the log read-only, compare it with its last backup and report the first bad record"


# --------------------------------------------------------------------------- events and records


def _check_text(value: object, name: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{name} must be one line without control characters")
    return value


def _check_sha256(value: object, name: str) -> str:
    if not (isinstance(value, str) and _SHA256_RE.fullmatch(value)):
        raise ValueError(f"{name} must be 64 lowercase hex digits")
    return value


def _check_digest(value: object, name: str) -> str:
    """A SHA-256 hex digest, or "" for "not applicable"."""
    return "" if value == "" else _check_sha256(value, name)


def _check_int(value: object, name: str) -> int:
    # bool is an int in Python but `true` is not a number in the format.
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def _json_object(value: object, name: str) -> dict[str, Any]:
    """A deep, plain-JSON copy: later changes by the caller cannot alter the event, and
    tuples become lists, so an event read back compares equal to the one written."""
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be a JSON object, got {type(value).__name__}")
    # The depth check here keeps a writer from appending a record that no reader would parse.
    # (the line's size limit is checked when the record is encoded, with its own message).
    return parse_strict_json(canonical_json(dict(value)), canonical=True, max_depth=MAX_JSON_DEPTH - 1)  # type: ignore[no-any-return]


def _check_recipients(value: object) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        raise ValueError(f"recipients must be a list of key ids, got {type(value).__name__}")
    return tuple(check_key_id(r) for r in value)


@dataclass(frozen=True)
class AuditEvent:
    """What a caller records.  Validated on construction (``ValueError`` for bad fields).

    Attributes:
        action: what happened, ``[a-z][a-z-]*`` (e.g. ``export``, ``ingest``, ``policy-sign``).
        outcome: ``"ok"``, ``"refused"`` or ``"error"``.
        reason: one human-readable line.
        bundle_id, payload_sha256, policy_id, policy_version, policy_sha256: what it was about.
        recipients: key ids the data went (or would have gone) to.
        dp: the DP record, canonical-JSON-able (no floats: decimal strings).
        details: anything else, canonical-JSON-able.
    """

    action: str
    outcome: str
    reason: str = ""
    bundle_id: str = ""
    payload_sha256: str = ""
    policy_id: str = ""
    policy_version: int | None = None
    policy_sha256: str = ""
    recipients: tuple[str, ...] = ()
    dp: Mapping[str, Any] = field(default_factory=dict)
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.action, str) or not _ACTION_RE.fullmatch(self.action):
            raise ValueError(f"action must match [a-z][a-z-]* (at most 64 characters), got {self.action!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {self.outcome!r}")
        for name in ("reason", "bundle_id", "policy_id"):
            _check_text(getattr(self, name), name)
        _check_digest(self.payload_sha256, "payload_sha256")
        _check_digest(self.policy_sha256, "policy_sha256")
        if self.policy_version is not None:
            _check_int(self.policy_version, "policy_version")
        # Frozen: normalise through object.__setattr__, once, here.
        object.__setattr__(self, "recipients", _check_recipients(self.recipients))
        object.__setattr__(self, "dp", _json_object(self.dp, "dp"))
        object.__setattr__(self, "details", _json_object(self.details, "details"))

    def fields(self) -> dict[str, Any]:
        """The event's part of a record, as JSON values."""
        return {
            "action": self.action, "outcome": self.outcome, "reason": self.reason,
            "bundle_id": self.bundle_id, "payload_sha256": self.payload_sha256,
            "policy_id": self.policy_id, "policy_version": self.policy_version,
            "policy_sha256": self.policy_sha256, "recipients": list(self.recipients),
            "dp": dict(self.dp), "details": dict(self.details),
        }


@dataclass(frozen=True)
class AuditRecord:
    """One parsed line of a log.  ``line`` is its exact bytes, without the ``\\n``."""

    seq: int
    time: str
    actor: str
    actor_name: str
    event: AuditEvent
    version: str
    prev: str
    signature: bytes
    line: bytes

    @property
    def hash(self) -> str:
        """Lowercase hex SHA-256 of ``line``: what the next record's ``prev`` holds."""
        return hashlib.sha256(self.line).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        """The record's JSON object as stored, plus its ``hash`` (for ``--json`` output)."""
        return {**_parse_line(self.line), "hash": self.hash}

    def signed_message(self) -> bytes:
        """The exact bytes ``sig`` signs (the stored object without ``sig``)."""
        unsigned = _parse_line(self.line)
        del unsigned["sig"]
        return signing_message(unsigned)


def signing_message(unsigned: Mapping[str, Any]) -> bytes:
    """Domain-separated bytes to sign: label || canonical JSON of the record without ``sig``."""
    return SIGNATURE_LABEL + canonical_json(dict(unsigned))


def encode_record(identity: Identity, event: AuditEvent, *, seq: int, prev: str, now: datetime | None = None) -> bytes:
    """Build and sign the line (without ``\\n``) for record ``seq`` following the record hashed ``prev``.

    Pure: touches no file.  :func:`append_event` is the safe way to add it to a log.

    Raises:
        ValueError: ``seq``/``prev`` malformed, or the record exceeds ``MAX_LINE_BYTES``.
    """
    _check_int(seq, "seq")
    _check_sha256(prev, "prev")
    unsigned = {
        "format": AUDIT_FORMAT, "seq": seq, "time": format_time(now or utc_now()),
        "actor": identity.key_id, "actor_name": identity.name, **event.fields(),
        "version": __version__, "prev": prev,
    }
    line = canonical_json({**unsigned, "sig": b64encode(identity.sign(signing_message(unsigned)))})
    if len(line) > MAX_LINE_BYTES:
        raise ValueError(f"audit record is {len(line)} bytes, over the {MAX_LINE_BYTES}-byte limit; shorten details")
    return line


# --------------------------------------------------------------------------- parsing one line


def _field_str(obj: dict[str, Any], name: str) -> str:
    return _check_text(obj[name], name)


def _event_from(obj: dict[str, Any]) -> AuditEvent:
    if not isinstance(obj["recipients"], list):
        raise ValueError("recipients must be an array")
    return AuditEvent(
        action=obj["action"], outcome=obj["outcome"], reason=obj["reason"],
        bundle_id=obj["bundle_id"], payload_sha256=obj["payload_sha256"],
        policy_id=obj["policy_id"], policy_version=obj["policy_version"],
        policy_sha256=obj["policy_sha256"], recipients=tuple(obj["recipients"]),
        dp=obj["dp"], details=obj["details"],
    )


def _check_shape(obj: object) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError("a record must be a JSON object")
    if set(obj) != _RECORD_FIELDS:
        missing, unknown = sorted(_RECORD_FIELDS - set(obj)), sorted(set(obj) - _RECORD_FIELDS)
        raise ValueError(f"wrong fields (missing {missing or 'none'}, unknown {unknown or 'none'})")
    if obj["format"] != AUDIT_FORMAT:
        raise ValueError(f"unknown format {obj['format']!r} (expected {AUDIT_FORMAT!r})")
    return obj


def _parse_line(line: bytes, *, canonical: bool = True) -> Any:
    """Every parse of log content goes through here: size and nesting bounded, never a RecursionError."""
    return parse_strict_json(line, canonical=canonical, max_depth=MAX_JSON_DEPTH, max_bytes=MAX_LINE_BYTES)


def _record_from_line(line: bytes) -> AuditRecord:
    """Parse one line strictly (steps 2-3 of the module docstring).  Raises ``ValueError``."""
    obj = _check_shape(_parse_line(line))
    parse_time(obj["time"])
    return AuditRecord(
        seq=_check_int(obj["seq"], "seq"), time=obj["time"], actor=check_key_id(obj["actor"]),
        actor_name=_field_str(obj, "actor_name"), event=_event_from(obj),
        version=_field_str(obj, "version"), prev=_check_sha256(obj["prev"], "prev"),
        signature=b64decode(_field_str(obj, "sig"), length=64), line=bytes(line),
    )


def _seq_hint(line: bytes) -> str:
    """Best-effort seq of a line that may not parse, for error messages only."""
    with contextlib.suppress(ValueError):
        obj = _parse_line(line, canonical=False)
        seq = obj.get("seq") if isinstance(obj, dict) else None
        if isinstance(seq, int) and not isinstance(seq, bool):
            return str(seq)
    # Not JSON: take the last "seq" key, since canonical order puts nested ones
    # (inside "details" and "dp") before the top-level one.
    matches = _SEQ_HINT_RE.findall(line)
    return matches[-1].decode() if matches else "unknown"


def _bad(path: str, where: str, line: bytes, why: str, hint: str = _TAMPER_HINT) -> AuditLogError:
    return AuditLogError(
        f"audit log {path}: {where} (seq {_seq_hint(line)}): {why}; the log may have been tampered with", hint=hint,
    )


def _parse_at(path: str, where: str, line: bytes) -> AuditRecord:
    try:
        return _record_from_line(line)
    except ValueError as e:
        raise _bad(path, where, line, f"not a valid {AUDIT_FORMAT} record ({e})") from e


# --------------------------------------------------------------------------- reading


@contextlib.contextmanager
def _shared_lock(path: str) -> Iterator[None]:
    """Hold ``<log>.lock`` shared while reading, so no half-written line of a live append is seen.

    Readers (a compliance office) may lack write access, so the lock file is never
    created here; no lock file means no writer ever appended through this module.
    """
    try:
        fd = os.open(path + ".lock", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_for_reading(path: str, *, missing_ok: bool) -> Any:
    try:
        return open(path, "rb")  # noqa: SIM115 - closed by the caller's `with`
    except FileNotFoundError as e:
        if missing_ok:
            return None
        raise AuditLogError(f"audit log {path} does not exist", hint="check the path; if records were written there, the log was deleted") from e
    except OSError as e:
        raise ResourceError(f"cannot read audit log {path}: {e.strerror}", hint="check the path and its permissions") from e


def _iter_lines(path: str, *, missing_ok: bool) -> Iterator[tuple[int, bytes]]:
    """Yield (1-based line number, line without ``\\n``); raise for a partial or oversized line."""
    with _shared_lock(path):
        f = _open_for_reading(path, missing_ok=missing_ok)
        if f is None:
            return
        with f:
            lineno = 0
            while raw := f.readline(MAX_LINE_BYTES + 1):  # bounded: a garbage file cannot exhaust memory
                lineno += 1
                if not raw.endswith(b"\n"):
                    raise _bad(path, f"line {lineno}", raw, _unterminated(raw))
                yield lineno, raw[:-1]


def _unterminated(raw: bytes) -> str:
    if len(raw) > MAX_LINE_BYTES:
        return f"line longer than {MAX_LINE_BYTES} bytes"
    return "incomplete last line (no final newline: a crash during an append, or truncation)"


def read_log(path: str | os.PathLike[str]) -> list[AuditRecord]:
    """Parse every record, without checking signatures or the chain (see :func:`verify_log`).

    Args:
        path: the log; a missing file is an empty log.

    Returns:
        The records in file order.

    Raises:
        AuditLogError: a line is partial, not canonical JSON, or not a record.
        ResourceError: the file cannot be read.
    """
    log = os.fspath(path)
    # closing(): release the shared lock now even if parsing raises, not when the
    # traceback (which keeps the generator alive) is collected.
    with contextlib.closing(_iter_lines(log, missing_ok=True)) as lines:
        return [_parse_at(log, f"line {n}", line) for n, line in lines]


def _link_problem(record: AuditRecord, index: int, prev: str, signer: PublicIdentity) -> str | None:
    """Steps 4-7 of the module docstring; the first failure's description, or None."""
    if record.seq != index:
        return f"seq is {record.seq} where {index} was expected: a record was deleted, inserted, duplicated or reordered"
    if record.prev != prev:
        return "prev does not match the hash of the previous line: a record was deleted, inserted or reordered"
    if record.actor != signer.key_id:
        return (f"written by key {record.actor} ({record.actor_name!r}), not by the expected signer {signer.key_id}: "
                "inserted by another identity, or the wrong --signer")
    if not signer.verify(record.signed_message(), record.signature):
        return "signature does not verify: the record was edited"
    return None


def _check_head(path: str, records: list[AuditRecord], expect_head: tuple[int, str]) -> None:
    count, digest = expect_head
    if count > len(records):
        raise AuditLogError(
            f"audit log {path} has {len(records)} records but the recorded head says {count}: "
            f"the newest {count - len(records)} were deleted (tail truncation)", hint=_TAMPER_HINT,
        )
    actual = records[count - 1].hash if count else GENESIS_PREV
    if actual != digest:
        raise AuditLogError(
            f"audit log {path}: line {count} (seq {count - 1}) has hash {actual}, but the recorded head says {digest}: "
            "the log was rewritten from there on, or it is a different log", hint=_TAMPER_HINT,
        )


def _check_expect_head(expect_head: object) -> tuple[int, str]:
    if not (isinstance(expect_head, tuple) and len(expect_head) == 2):
        raise ValueError("expect_head must be a (count, hash) tuple from head()")
    count, digest = expect_head
    _check_int(count, "expected count")
    if not (isinstance(digest, str) and _SHA256_RE.fullmatch(digest)):
        raise ValueError("expected hash must be 64 lowercase hex digits")
    return count, digest


def verify_log(
    path: str | os.PathLike[str], signer: PublicIdentity, expect_head: tuple[int, str] | None = None
) -> list[AuditRecord]:
    """Fully check a log: format, canonical bytes, seq, hash chain, actor and signatures.

    Args:
        path: the log.
        signer: public identity of the log's (single) writer.
        expect_head: ``(count, hash)`` written down earlier from :func:`head`; when
            given, record ``count - 1`` must still have that hash, which detects
            deletion of the newest records (undetectable otherwise).

    Returns:
        The verified records.

    Raises:
        AuditLogError: the log is missing, or naming the first bad record by line
            number and seq, or the expected head is gone.
        ResourceError: the file cannot be read.
    """
    expected = None if expect_head is None else _check_expect_head(expect_head)
    log = os.fspath(path)
    records: list[AuditRecord] = []
    prev = GENESIS_PREV
    with contextlib.closing(_iter_lines(log, missing_ok=False)) as lines:  # see read_log
        for lineno, line in lines:
            record = _parse_at(log, f"line {lineno}", line)
            problem = _link_problem(record, len(records), prev, signer)
            if problem:
                raise _bad(log, f"line {lineno}", line, problem)
            records.append(record)
            prev = record.hash
    if expected is not None:
        _check_head(log, records, expected)
    return records


# --------------------------------------------------------------------------- the tail


def _pread_exact(fd: int, size: int, offset: int) -> bytes:
    chunks = []
    while size:
        chunk = os.pread(fd, size, offset)
        if not chunk:
            raise OSError(errno.EIO, "file shrank while reading")
        chunks.append(chunk)
        size, offset = size - len(chunk), offset + len(chunk)
    return b"".join(chunks)


def _read_last_line(path: str, fd: int, block: int = _TAIL_BLOCK) -> bytes | None:
    """The last line (without ``\\n``), read backwards in blocks; None for an empty file.

    Raises:
        AuditLogError: the file does not end with ``\\n``, or the last line is oversized.
    """
    end = os.fstat(fd).st_size - 1  # offset of what must be the final newline
    if end < 0:
        return None
    if _pread_exact(fd, 1, end) != b"\n":
        tail = _pread_exact(fd, min(end + 1, 256), max(0, end + 1 - 256))
        raise _bad(path, "last line", tail, _unterminated(b""), hint=_PARTIAL_HINT)
    buf, pos = b"", end
    while pos > 0 and len(buf) <= MAX_LINE_BYTES:
        step = min(block, pos)
        pos -= step
        buf = _pread_exact(fd, step, pos) + buf
        cut = buf.rfind(b"\n")
        if cut >= 0:
            return buf[cut + 1 :]
    if len(buf) > MAX_LINE_BYTES:
        raise _bad(path, "last line", buf[-256:], f"line longer than {MAX_LINE_BYTES} bytes")
    return buf


def head(path: str | os.PathLike[str]) -> tuple[int, str]:
    """``(record count, hash of the last line)`` to write down elsewhere; ``(0, 64 zeros)`` when empty.

    Reads only the end of the file and verifies nothing: run :func:`verify_log`
    first, then keep the head where the log's writer cannot change it.

    Raises:
        AuditLogError: the last line is partial or not a record.
        ResourceError: the file cannot be read.
    """
    log = os.fspath(path)
    with _shared_lock(log):
        f = _open_for_reading(log, missing_ok=True)
        if f is None:
            return 0, GENESIS_PREV
        with f:
            last = _read_last_line(log, f.fileno())
    if last is None:
        return 0, GENESIS_PREV
    record = _parse_at(log, "last line", last)
    return record.seq + 1, record.hash


# --------------------------------------------------------------------------- appending


@contextlib.contextmanager
def _exclusive_lock(log: str) -> Iterator[None]:
    try:
        fd = os.open(log + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise ResourceError(f"cannot write audit log {log}: {e.strerror}", hint="check the folder exists and is writable") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK on some network file systems
            raise ResourceError(f"cannot lock audit log {log}: {e.strerror}", hint="keep audit logs on a local disk") from e
        yield
    finally:
        os.close(fd)  # releases the lock


def _open_for_append(log: str) -> int:
    try:
        return os.open(log, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, LOG_MODE)
    except OSError as e:
        raise ResourceError(f"cannot write audit log {log}: {e.strerror}", hint="check the folder exists and is writable") from e


def _next_link(log: str, fd: int, identity: Identity) -> tuple[int, str]:
    """(seq, prev) for the next record; refuses garbage tails and foreign writers."""
    last = _read_last_line(log, fd)
    if last is None:
        return 0, GENESIS_PREV
    record = _parse_at(log, "last line", last)
    if record.actor != identity.key_id:
        raise AuditLogError(
            f"audit log {log} is written by key {record.actor} ({record.actor_name}); "
            f"{identity.name} ({identity.key_id}) may not append to it",
            hint="each audit log has one writing identity; use a separate log for this one",
        )
    return record.seq + 1, record.hash


def _write_line(log: str, fd: int, line: bytes) -> None:
    """Append ``line + \\n`` and fsync; on failure cut the file back so no partial line remains."""
    start = os.fstat(fd).st_size
    view = memoryview(line + b"\n")
    try:
        while view:  # os.write may write less than asked (signals, quotas)
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.ftruncate(fd, start)  # we hold the lock: nothing after `start` is anyone else's
        raise ResourceError(f"cannot append to audit log {log}: {e.strerror}", hint="check free disk space and permissions") from e


def _fsync_dir(log: str) -> None:
    try:
        fsync_dir(os.path.dirname(os.path.abspath(log)))
    except OSError as e:
        raise ResourceError(f"cannot sync the folder of audit log {log}: {e.strerror}") from e


def append_event(
    path: str | os.PathLike[str], identity: Identity, event: AuditEvent, now: datetime | None = None
) -> AuditRecord:
    """Sign ``event`` as the next record and append it durably (fsynced) to the log at ``path``.

    Safe across processes (exclusive ``flock`` on ``<log>.lock``).  Creates the
    log with mode 0640 if missing.  A caller that cannot record an action must not
    perform it (DESIGN.md invariant 7): let the error propagate.

    Args:
        path: the log file.
        identity: the writer; every record of one log is by the same identity.
        event: what to record.
        now: the record's time (default: now, UTC).

    Returns:
        The record as written.

    Raises:
        AuditLogError: the log ends in a partial line (a crash mid-append; run
            ``secure-oneshot audit verify``), its last record is damaged, or it
            belongs to another identity.
        ResourceError: the log or its lock file cannot be written.
    """
    log = os.fspath(path)
    with _exclusive_lock(log):
        created = not os.path.exists(log)
        fd = _open_for_append(log)
        try:
            seq, prev = _next_link(log, fd, identity)
            line = encode_record(identity, event, seq=seq, prev=prev, now=now)
            _write_line(log, fd, line)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(log)
    return _record_from_line(line)
