"""``ingest``: take an inbox of bundles; accept the good ones, quarantine the rest with reasons.

One run at a time: the run holds ``<server>/.lock`` exclusively (``distill``
takes it shared), so the ledger, the registry, the quarantine and the audit log
are only ever written by one process.

For each inbox entry whose name ends in ``.sob``, in name order:

1. ``lstat`` it; anything but a regular file (symlink, FIFO, socket, device,
   folder) is refused without being opened.  Then it is opened once with
   ``O_NOFOLLOW | O_NONBLOCK`` (a FIFO swapped in cannot block the run) and its
   ``fstat`` is checked again.
2. Its real length is compared with the largest file a bundle within the ingest
   policy's ``max_bundle_bytes`` can be, before a byte is read (a sparse 8 TiB
   file is refused at once).
3. Its bytes are copied from that one descriptor into a private staging file
   (``<server>/.staging/``, 0700/0600), hashing them on the way.  Everything
   after this works on the staged copy only: replacing or rewriting the inbox
   file from here on changes nothing.
4. Replay check, verify and decrypt (FORMAT.md section 7, with the policy's size
   limit applied before decryption) chunk by chunk into an anonymous file in
   staging (never the payload in memory), ingest policy.
5. Accepted: the staged file is renamed into ``accepted/<bundle_id>.sob`` (the
   very bytes that were verified), the registry entry ``accepted/<bundle_id>.json``
   records their SHA-256 (``file_sha256``) and the ingest policy, and only then is
   the bundle id written to the replay ledger.
   Refused: the staged copy (or, when nothing could be staged, the entry itself,
   renamed without being opened) goes to ``quarantine/<UTC time>-<random>.sob``
   with ``<UTC time>-<random>.reason.json`` beside it.  Generated names: the
   original name, escaped, is kept in the reason file (``file``, plus its raw
   bytes in hex), so no name can break the quarantine step.
6. The inbox entry is removed only if it is still the file that was copied
   (same device and inode); one replaced meanwhile stays for the next run.

Any exception while handling one entry quarantines that entry and the run goes
on with the next; exceptions that are not a :class:`SecureOneshotError` are
recorded as ``internal error while processing: <type>: <message>``.  Every
string derived from an entry (its name, reasons) is escaped with
:func:`~secure_oneshot._internal.termsafe.printable` before it reaches an
outcome, so it can be shown on a terminal as is.

Re-running is idempotent: processed bundles leave the inbox, so a second run
finds nothing to do; a bundle that arrives again after acceptance is a replay
and is quarantined as such, whatever its bytes.
"""

from __future__ import annotations

import contextlib
import os
import stat
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import audit
from .._internal.atomic import fsync_dir
from .._internal.encoding import format_time, utc_now
from .._internal.termsafe import printable, printable_name
from ..bundle import OpenedBundle, ReplayLedger, VerifyOptions, inspect_bundle, open_bundle
from ..errors import BundleFormatError, ConfigError, PolicyViolationError, PrivacyError, SecureOneshotError
from ..keys import Identity, TrustStore
from ..policy.dp import DpRecord, check_bundle_history, composed_epsilon, group_by_dataset
from ..policy.evaluate import Evaluation, evaluate_ingest
from ..policy.explain import denial_summary
from ..policy.model import IngestPolicy
from ..policy.privacy_statement import check_statement, summary_line
from ..policy.structure import classify_tensors
from ..policy.site_policy import check_site_policy
from .registry import StagedFile, bundle_file_limit, generated_name, private_dir, server_lock, stage_copy, write_private_json

__all__ = ["IngestFolders", "BundleOutcome", "ingest_inbox", "check_ingest_policy", "policy_record"]

MAX_REASON_CHARS = 2000  # an outcome's reason, escaped; the reason file keeps the same text


@dataclass(frozen=True)
class IngestFolders:
    inbox: Path
    accepted: Path
    quarantine: Path
    ledger: Path
    audit_log: Path

    @classmethod
    def under(cls, root: Path, inbox: Path | None = None) -> IngestFolders:
        """The default layout under one server folder."""
        return cls(inbox or root / "inbox", root / "accepted", root / "quarantine", root / "ledger.db", root / "audit.jsonl")

    @property
    def root(self) -> Path:
        """The server folder: holds the lock and the staging area, on the same filesystem as ``accepted/``."""
        return self.accepted.parent

    @property
    def staging(self) -> Path:
        return self.root / ".staging"


@dataclass
class BundleOutcome:
    file: str                # the inbox name, escaped for printing (termsafe.printable)
    outcome: str             # "accepted" | "quarantined"
    bundle_id: str = ""
    sender: str = ""
    error: str = ""          # error class name when quarantined
    reason: str = ""         # escaped, one line
    decisions: list[dict[str, Any]] = field(default_factory=list)
    stored_as: str = ""      # where the bytes went, relative to the server folder ("" if they stayed in the inbox)
    reason_file: str = ""    # quarantine/<name>.reason.json, relative to the server folder
    left_in_inbox: bool = False
    privacy_summary: str = ""  # the accepted bundle's privacy statement in one line (escaped)


def _check_policy(policy: IngestPolicy, opened: OpenedBundle, trust: TrustStore | None = None, now: datetime | None = None) -> Evaluation:
    where = f"bundle {opened.header.bundle_id}: manifest"
    if not isinstance(opened.manifest.dp, dict):
        raise PrivacyError(f"{where}: dp must be an object")
    check_bundle_history(opened.manifest.dp)  # bound the accountant's work before parsing any record
    dp = {a: DpRecord.from_json(r, f"{where} dp.{a}") for a, r in opened.manifest.dp.items()}
    ev = evaluate_ingest(policy, opened.header.sender, opened.tensors, dp, opened.manifest.meta, opened.header.payload_size)
    if not ev.allowed:
        error = PrivacyError if any(d.kind == "dp" for d in ev.denied) else PolicyViolationError
        raise error(f"refused by ingest policy {policy.id} v{policy.version}: {denial_summary(ev)}",
                    data={"decisions": [d.to_json() for d in ev.decisions]})
    # The site's own signed export policy, carried in the bundle (require_site_policy; approvals against `trust`).
    check_site_policy(policy, opened.manifest, opened.tensors, dp, trust, now)
    check_privacy_statement(opened, dp, ev.epsilons)
    return ev


def check_privacy_statement(opened: OpenedBundle, dp: dict[str, DpRecord], epsilons: dict[str, float]) -> None:
    """The site's signed privacy statement must agree with the bundle's own tensors and DP records.

    A bundle without one (written by ``seal``, or before statements existed) passes here; the ingest policy's other
    rules still apply.  The compositions the statement gives for this bundle are recomputed (bounded: the DP
    histories were counted by :func:`check_bundle_history`).

    Raises:
        PrivacyError: the statement breaks its schema or disagrees with the bundle (every disagreement listed).
    """
    meta = opened.manifest.meta if isinstance(opened.manifest.meta, dict) else {}
    if "privacy_statement" not in meta:
        return
    manifest = opened.manifest.to_json()
    artifacts = classify_tensors(opened.tensors, meta.get("artifacts", {})).artifacts
    composed = {"+".join(names): composed_epsilon([dp[n] for n in names], sum(dp[n].delta for n in names))
                for names in group_by_dataset(dp).values() if len(names) >= 2}
    problems = check_statement(meta["privacy_statement"], manifest=manifest, tensor_artifacts=artifacts,
                               tensor_bytes={n: int(t.nbytes) for n, t in opened.tensors.items()}, dp=dp, epsilons=epsilons,
                               composed=composed)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise PrivacyError(f"privacy statement disagrees with the bundle: {'; '.join(problems[:3])}{more}",
                           hint="the site's statement does not describe what it sent; ask the site to check its export",
                           data={"statement_problems": problems})


def check_ingest_policy(policy: IngestPolicy, opened: OpenedBundle, trust: TrustStore | None = None, now: datetime | None = None) -> Evaluation:
    """Evaluate a verified bundle against the ingest policy (what ``ingest`` does, and ``distill`` again).

    ``trust``: the server's trust store, whose approvers must have approved the site policy a bundle carries when
    the policy sets ``require_site_policy`` (without it no approval counts).

    Raises:
        PolicyViolationError, PrivacyError: the policy refuses it.
    """
    return _check_policy(policy, opened, trust, now)


def policy_record(policy: IngestPolicy) -> dict[str, Any]:
    """Which ingest policy accepted a bundle: id, version, SHA-256 and the file's absolute path."""
    source = policy.source if policy.source and not policy.source.startswith("<") else ""
    return {"id": policy.id, "version": policy.version, "sha256": policy.sha256, "path": os.path.abspath(source) if source else ""}


@dataclass
class _Context:
    identity: Identity
    trust: TrustStore
    policy: IngestPolicy
    folders: IngestFolders
    ledger: ReplayLedger
    now: datetime
    inbox_fd: int
    file_limit: int


@dataclass
class _Entry:
    """One inbox entry as it goes through the steps: its raw name, what was opened, what was staged."""

    name: str
    info: os.stat_result | None = None
    staged: StagedFile | None = None

    @property
    def shown(self) -> str:
        return printable_name(self.name)


_FILE_TYPES = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _require_regular(mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _FILE_TYPES if test(mode)), "not a regular file")
        raise BundleFormatError(f"inbox entry is {kind}, not a regular file; it was not opened",
                                hint="deliver bundles as plain files; links and special files are never followed")


def _stage(entry: _Entry, ctx: _Context) -> StagedFile:
    """Steps 1-3: check the entry without following it, open it once, copy it into staging."""
    try:
        _require_regular(os.stat(entry.name, dir_fd=ctx.inbox_fd, follow_symlinks=False).st_mode)
        fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=ctx.inbox_fd)
    except OSError as e:
        raise BundleFormatError(f"cannot open the inbox entry: {e.strerror or e}") from e
    try:
        entry.info = os.fstat(fd)
        _require_regular(entry.info.st_mode)  # what was opened, not what the name pointed to a moment ago
        if entry.info.st_size > ctx.file_limit:
            raise BundleFormatError(
                f"file of {entry.info.st_size} bytes exceeds the largest possible bundle under this policy ({ctx.file_limit} bytes); "
                "it was not read", hint=f"the ingest policy allows payloads up to {ctx.policy.max_bundle_bytes} bytes")
        return stage_copy(fd, ctx.folders.staging, ctx.file_limit)
    finally:
        os.close(fd)


def _remove_from_inbox(entry: _Entry, ctx: _Context) -> bool:
    """Unlink the inbox entry if it is still the file that was copied; True if it is gone."""
    try:
        now = os.stat(entry.name, dir_fd=ctx.inbox_fd, follow_symlinks=False)
        if entry.info is None or (now.st_dev, now.st_ino) != (entry.info.st_dev, entry.info.st_ino):
            return False  # replaced after it was copied: a different file, left for the next run
        os.unlink(entry.name, dir_fd=ctx.inbox_fd)
    except FileNotFoundError:
        pass
    except OSError:
        return False  # e.g. a read-only inbox: what was stored is unaffected; the entry stays
    return True


def _registry_entry(opened: OpenedBundle, ev: Evaluation, staged: StagedFile, entry: _Entry, ctx: _Context) -> dict[str, Any]:
    return {
        "bundle_id": opened.header.bundle_id,
        "sender": opened.header.sender,
        "sender_name": opened.sender.name,
        "accepted_at": format_time(ctx.now),
        "received_as": entry.shown,
        "file_sha256": staged.sha256,
        "file_bytes": staged.size,
        "ingest_policy": policy_record(ctx.policy),
        "manifest": opened.manifest.to_json(),
        "recomputed_epsilon": {k: repr(v) for k, v in ev.epsilons.items()},
        "tensors": sorted(opened.tensors),
        "storage": "encrypted at rest: the bundle file beside this entry (file_sha256 is its SHA-256); open it with the server key",
    }


def _accept(entry: _Entry, opened: OpenedBundle, ev: Evaluation, ctx: _Context) -> BundleOutcome:
    """Step 5: stored bytes, then registry entry, then ledger; on failure the stored copy goes back to staging."""
    assert entry.staged is not None
    bundle_id = opened.header.bundle_id
    stored, registry = ctx.folders.accepted / f"{bundle_id}.sob", ctx.folders.accepted / f"{bundle_id}.json"
    os.replace(entry.staged.path, stored)
    try:
        fsync_dir(ctx.folders.accepted)
        write_private_json(registry, _registry_entry(opened, ev, entry.staged, entry, ctx))
        opened.record_in(ctx.ledger, ctx.now)  # only after the stored copy and its registry entry are durable
    except BaseException:
        with contextlib.suppress(OSError):
            registry.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            os.replace(stored, entry.staged.path)  # so that the quarantine step finds it
        raise
    entry.staged = None
    left = not _remove_from_inbox(entry, ctx)
    statement = opened.manifest.meta.get("privacy_statement") if isinstance(opened.manifest.meta, dict) else None
    summary = printable(summary_line(statement), 200) if statement is not None else "no privacy statement"
    return BundleOutcome(entry.shown, "accepted", bundle_id, opened.header.sender, stored_as=f"accepted/{stored.name}", left_in_inbox=left,
                         privacy_summary=summary)


def _describe(error: BaseException) -> dict[str, Any]:
    if isinstance(error, SecureOneshotError):
        return {"error": type(error).__name__, "exit_code": error.exit_code, "message": printable(error.message, MAX_REASON_CHARS),
                "hint": printable(error.hint, MAX_REASON_CHARS), **error.data}
    short = printable(f"{type(error).__name__}: {error}", 300)
    return {"error": type(error).__name__, "exit_code": 1, "message": f"internal error while processing: {short}",
            "hint": "the entry was set aside and the others were processed; report this with the reason file"}


def _set_aside(entry: _Entry, stem: str, ctx: _Context) -> tuple[str, bool]:
    """Move the entry's bytes into quarantine: the staged copy, else the entry itself (renamed, never opened)."""
    target = ctx.folders.quarantine / f"{stem}.sob"
    if entry.staged is not None:
        os.replace(entry.staged.path, target)
        entry.staged = None
        return f"quarantine/{target.name}", not _remove_from_inbox(entry, ctx)
    try:
        os.rename(entry.name, target, src_dir_fd=ctx.inbox_fd)
    except OSError:
        return "", True  # vanished, or the inbox is on another filesystem: left where it is, the reason says so
    return f"quarantine/{target.name}", False


def _quarantine(entry: _Entry, error: BaseException, ctx: _Context) -> BundleOutcome:
    described = _describe(error)
    stem = generated_name(ctx.now)
    sha256 = entry.staged.sha256 if entry.staged else ""
    stored_as, left = _set_aside(entry, stem, ctx)
    reason = {**described, "file": entry.shown, "file_name_hex": os.fsencode(entry.name).hex(), "quarantined_at": format_time(ctx.now),
              "stored_as": stored_as, "left_in_inbox": left, "file_sha256": sha256}
    reason_file = ctx.folders.quarantine / f"{stem}.reason.json"
    write_private_json(reason_file, reason)
    return BundleOutcome(entry.shown, "quarantined", error=described["error"], reason=described["message"],
                         decisions=described.get("decisions", []), stored_as=stored_as, reason_file=f"quarantine/{reason_file.name}", left_in_inbox=left)


def _ingest_one(name: str, ctx: _Context) -> BundleOutcome:
    entry = _Entry(name)
    try:
        entry.staged = _stage(entry, ctx)
        ctx.ledger.check(inspect_bundle(entry.staged.path).bundle_id)
        # The decrypted payload goes to an anonymous file in the private staging folder, not to a shared /tmp.
        options = VerifyOptions(max_payload_bytes=ctx.policy.max_bundle_bytes, scratch_dir=ctx.folders.staging)
        opened = open_bundle(entry.staged.path, ctx.identity, ctx.trust, now=ctx.now, options=options)
        ev = _check_policy(ctx.policy, opened, ctx.trust, ctx.now)
        return _accept(entry, opened, ev, ctx)
    except Exception as error:  # noqa: BLE001 - one entry, whatever it holds, never stops the run
        return _quarantine_or_report(entry, error, ctx)


def _quarantine_or_report(entry: _Entry, error: Exception, ctx: _Context) -> BundleOutcome:
    try:
        return _quarantine(entry, error, ctx)
    except Exception as failure:  # noqa: BLE001 - e.g. a full disk: report it and go on
        described = _describe(error)
        note = printable(f"{type(failure).__name__}: {failure}", 300)
        return BundleOutcome(entry.shown, "quarantined", error=described["error"],
                             reason=f"{described['message']} (could not be set aside: {note})", left_in_inbox=True)
    finally:
        if entry.staged is not None:
            with contextlib.suppress(OSError):
                os.unlink(entry.staged.path)


def _audit(ctx: _Context, outcome: BundleOutcome) -> None:
    event = audit.AuditEvent(
        action="ingest", outcome="ok" if outcome.outcome == "accepted" else "refused",
        reason=outcome.reason or "accepted", bundle_id=outcome.bundle_id, policy_id=ctx.policy.id,
        policy_version=ctx.policy.version, policy_sha256=ctx.policy.sha256,
        details={"file": outcome.file, "sender": outcome.sender, "error": outcome.error, "stored_as": outcome.stored_as},
    )
    audit.append_event(ctx.folders.audit_log, ctx.identity, event, ctx.now)


def _clear_staging(staging: Path) -> None:
    """Under the exclusive lock nothing in staging belongs to a live run: remove what a crashed one left."""
    for leftover in os.scandir(staging):
        if leftover.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):
                os.unlink(leftover.path)


def _open_inbox(inbox: Path) -> int:
    try:
        return os.open(inbox, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(f"cannot open the inbox folder {inbox}: {e.strerror or e}", hint="check --server-dir / --inbox") from e


def ingest_inbox(folders: IngestFolders, identity: Identity, trust: TrustStore, policy: IngestPolicy, now: datetime | None = None,
                 *, wait: bool = False) -> list[BundleOutcome]:
    """Process every ``*.sob`` entry of the inbox (see the module docstring); returns one outcome per entry.

    Args:
        wait: queue behind a run that holds the server folder instead of failing.

    Raises:
        ResourceError: another ingest or a distill holds the server folder (and ``wait`` is False).
        ConfigError: the inbox folder cannot be opened.
        AuditLogError: the audit log cannot be appended to (the run stops: nothing is done unrecorded).
    """
    inbox_fd = _open_inbox(folders.inbox)
    try:
        with server_lock(folders.root, wait=wait):
            for folder in (folders.accepted, folders.quarantine, folders.staging):
                private_dir(folder)
            _clear_staging(folders.staging)
            ledger = ReplayLedger(folders.ledger)
            ctx = _Context(identity, trust, policy, folders, ledger, now or utc_now(), inbox_fd, bundle_file_limit(policy.max_bundle_bytes))
            try:
                return _run(ctx)
            finally:
                ledger.close()
    finally:
        os.close(inbox_fd)


def _run(ctx: _Context) -> list[BundleOutcome]:
    outcomes = []
    for name in sorted(n for n in os.listdir(ctx.inbox_fd) if n.endswith(".sob")):
        outcome = _ingest_one(name, ctx)
        _audit(ctx, outcome)
        outcomes.append(outcome)
    return outcomes
