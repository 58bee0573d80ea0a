"""``secure-oneshot audit verify | show | head``: check and read a site's or server's audit log.

Read-only: nothing here appends.  Records are written by the commands that act
(export, ingest, ...) through :func:`secure_oneshot.audit.append_event`.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
from typing import Any

from ..audit import GENESIS_PREV, AuditRecord, head, read_log, verify_log
from ..errors import AuditLogError, ResourceError
from ..keys import format_key_id, load_public
from .output import Result

__all__ = ["register"]

_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_DIGITS_RE = re.compile(r"[0-9]{1,16}")
_TABLE_HEADERS = ("seq", "time", "actor", "action", "outcome", "bundle", "policy", "reason")


def _count(text: str) -> int:
    """argparse type: a record count (non-negative integer, ASCII digits only)."""
    if not _DIGITS_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a record count (a non-negative integer)")
    return int(text)


def _positive(text: str) -> int:
    """argparse type: a positive integer."""
    if not _DIGITS_RE.fullmatch(text) or int(text) == 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def _sha256_hex(text: str) -> str:
    """argparse type: a SHA-256 hex digest, as `audit head` prints it (any case, spaces ignored)."""
    digest = text.replace(" ", "").lower()
    if not _HEX64_RE.fullmatch(digest):
        raise argparse.ArgumentTypeError(f"{text!r} is not a 64-digit hex SHA-256 (copy it from `secure-oneshot audit head`)")
    return digest


def _require_log(path: str) -> None:
    # The API treats a missing log as empty; at the command line it is far more
    # likely a typo, and "0 records" would hide that.
    if not os.path.exists(path):
        raise ResourceError(f"no audit log at {path}", hint="check the path of the log file")


def _verify(parser: argparse.ArgumentParser, args: argparse.Namespace) -> Result:
    if (args.expect_count is None) != (args.expect_hash is None):
        parser.error("--expect-count and --expect-hash go together (both come from `secure-oneshot audit head`)")
    signer = load_public(args.signer)
    expect = None if args.expect_count is None else (args.expect_count, args.expect_hash)
    records = verify_log(args.log, signer, expect_head=expect)
    last = records[-1].hash if records else GENESIS_PREV
    lines = [
        f"OK: {len(records)} records, chain intact, last hash {last}",
        f"signed by {signer.name} ({format_key_id(signer.key_id)})",
        f"the recorded head ({args.expect_count} records) is still in the log" if expect else
        "note: deleting the newest records is only detected with --expect-count/--expect-hash (see `audit head`)",
    ]
    data = {"log": args.log, "records": len(records), "last_hash": last, "signer": signer.key_id,
            "expect_head_checked": expect is not None, "verified": True}
    return Result(data, lines)


def _policy_cell(record: AuditRecord) -> str:
    event = record.event
    if not event.policy_id:
        return "-"
    return event.policy_id if event.policy_version is None else f"{event.policy_id}@{event.policy_version}"


def _row(record: AuditRecord) -> tuple[str, ...]:
    event = record.event
    return (str(record.seq), record.time, record.actor_name, event.action, event.outcome,
            event.bundle_id[:8] or "-", _policy_cell(record), event.reason or "-")


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns sized to their content; the last (reason) is not padded."""
    all_rows = [_TABLE_HEADERS, *rows]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(_TABLE_HEADERS) - 1)]
    return ["  ".join([*(cell.ljust(w) for cell, w in zip(row, widths)), row[-1]]).rstrip() for row in all_rows]


def _show(args: argparse.Namespace) -> Result:
    _require_log(args.log)
    status, records, failure = _read_for_show(args)
    shown = records[-args.last:] if args.last else records
    if args.html:
        from ..research.html_audit import write_audit_log

        write_audit_log(args.html, args.log, shown, status, total=len(records))
    if failure is not None:
        raise failure  # the page says so too; the exit status must not read as success
    verified = status.verified is True
    data: dict[str, Any] = {"log": args.log, "total": len(records), "records": [r.to_dict() for r in shown], "verified": verified}
    if args.html:
        data["html"] = args.html
    note = (f"verified against {status.signer}: chain intact" if verified else
            f"NOT verified: run `secure-oneshot audit verify {args.log} --signer FILE.pub`")
    lines = [*_table([_row(r) for r in shown]), f"{len(shown)} of {len(records)} records shown; {note}",
             *([f"report: {args.html}"] if args.html else [])]
    return Result(data, lines)


def _read_for_show(args: argparse.Namespace) -> tuple[Any, list[AuditRecord], AuditLogError | None]:
    """The records and what is known of their integrity: verified with ``--signer``, else only read.  A log that fails
    verification is still read (when it parses) so that the HTML page can show what it holds beside the failure."""
    from ..research.html_audit import LogStatus

    if not args.signer:
        return LogStatus(None), read_log(args.log), None
    signer = load_public(args.signer)
    who = f"{signer.name} ({format_key_id(signer.key_id)})"
    try:
        records = verify_log(args.log, signer)
    except AuditLogError as e:
        try:
            readable = read_log(args.log)
        except AuditLogError:
            readable = []
        return LogStatus(False, who, e.message), readable, e
    return LogStatus(True, who, last_hash=records[-1].hash if records else GENESIS_PREV), records, None


def _head(args: argparse.Namespace) -> Result:
    _require_log(args.log)
    count, last = head(args.log)
    lines = [
        f"records    {count}",
        f"last hash  {last}",
        "write both down where the log's writer cannot change them (a ticket, a paper log); later",
        f"  secure-oneshot audit verify {args.log} --signer FILE.pub --expect-count {count} --expect-hash {last}",
        "detects deletion of the newest records.  (Not verified: run `audit verify` first.)",
    ]
    return Result({"log": args.log, "count": count, "last_hash": last, "verified": False}, lines)


def register(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:  # type: ignore[type-arg]
    audit = commands.add_parser("audit", help="verify and read a hash-chained, signed audit log", parents=[common])
    sub = audit.add_subparsers(dest="audit_command", metavar="ACTION", required=True)

    verify = sub.add_parser("verify", help="check every record's signature, seq and hash chain", parents=[common])
    verify.add_argument("log", metavar="LOG")
    verify.add_argument("--signer", required=True, metavar="FILE.pub", help="public identity of the log's writer")
    verify.add_argument("--expect-count", type=_count, metavar="N", help="record count written down earlier (`audit head`)")
    verify.add_argument("--expect-hash", type=_sha256_hex, metavar="HEX", help="last hash written down with that count")
    verify.set_defaults(handler=functools.partial(_verify, verify))  # the parser, for its usage error

    show = sub.add_parser("show", help="print the records as a table (verified only with --signer)", parents=[common])
    show.add_argument("log", metavar="LOG")
    show.add_argument("--last", type=_positive, metavar="N", help="only the newest N records")
    show.add_argument("--signer", metavar="FILE.pub", help="also verify the log against its writer's public identity")
    show.add_argument("--html", metavar="OUT.html",
                      help="also write a self-contained page for reviewers (verification status first, every event readable)")
    show.set_defaults(handler=_show)

    head_cmd = sub.add_parser("head", help="print the record count and last hash, to write down elsewhere", parents=[common])
    head_cmd.add_argument("log", metavar="LOG")
    head_cmd.set_defaults(handler=_head)
