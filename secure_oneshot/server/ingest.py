"""``ingest``: take an inbox of bundles; accept the good ones, quarantine the rest with reasons.

For each bundle, in name order: replay check -> verify and decrypt (FORMAT.md
section 7, with the policy's size limit applied before decryption) -> ingest
policy -> accept or quarantine.  One bad bundle never stops the others.

Accepted bundles are kept **encrypted at rest**: the bundle file itself is
copied to ``accepted/<bundle_id>.sob`` with a JSON registry entry beside it
(sender, manifest, recomputed epsilons, tensor names: no tensor values).
``distill`` re-opens them with the server key when it needs the tensors.

Re-running is idempotent: processed bundles leave the inbox (accepted ones are
copied to ``accepted/`` and removed, refused ones are moved to
``quarantine/``), so a second run finds nothing to do.  The ledger is written
only after the accepted copy is durable, so a crash in between re-processes the
bundle cleanly; a bundle that arrives again after acceptance is a replay and is
quarantined as such, whatever its bytes.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .. import audit
from .._internal.atomic import atomic_write_bytes
from .._internal.encoding import format_time, utc_now
from ..bundle import OpenedBundle, ReplayLedger, VerifyOptions, inspect_bundle, open_bundle
from ..errors import PolicyViolationError, PrivacyError, SecureOneshotError
from ..keys import Identity, TrustStore
from ..policy.dp import DpRecord
from ..policy.evaluate import Evaluation, evaluate_ingest
from ..policy.explain import denial_summary
from ..policy.model import IngestPolicy

__all__ = ["IngestFolders", "BundleOutcome", "ingest_inbox"]


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


@dataclass
class BundleOutcome:
    file: str
    outcome: str             # "accepted" | "quarantined"
    bundle_id: str = ""
    sender: str = ""
    error: str = ""          # error class name when quarantined
    reason: str = ""
    decisions: list[dict[str, Any]] = field(default_factory=list)


def _check_policy(policy: IngestPolicy, opened: OpenedBundle) -> Evaluation:
    where = f"bundle {opened.header.bundle_id}: manifest"
    if not isinstance(opened.manifest.dp, dict):
        raise PrivacyError(f"{where}: dp must be an object")
    dp = {a: DpRecord.from_json(r, f"{where} dp.{a}") for a, r in opened.manifest.dp.items()}
    ev = evaluate_ingest(policy, opened.header.sender, opened.tensors, dp, opened.manifest.meta, opened.header.payload_size)
    if not ev.allowed:
        error = PrivacyError if any(d.kind == "dp" for d in ev.denied) else PolicyViolationError
        raise error(f"refused by ingest policy {policy.id} v{policy.version}: {denial_summary(ev)}",
                    data={"decisions": [d.to_json() for d in ev.decisions]})
    return ev


def _registry_entry(opened: OpenedBundle, ev: Evaluation, now: datetime) -> dict[str, Any]:
    return {
        "bundle_id": opened.header.bundle_id,
        "sender": opened.header.sender,
        "sender_name": opened.sender.name,
        "accepted_at": format_time(now),
        "manifest": opened.manifest.to_json(),
        "recomputed_epsilon": {k: repr(v) for k, v in ev.epsilons.items()},
        "tensors": sorted(opened.tensors),
        "storage": "encrypted at rest: the bundle file beside this entry; open it with the server key",
    }


def _accept(path: Path, opened: OpenedBundle, ev: Evaluation, folders: IngestFolders, ledger: ReplayLedger, now: datetime) -> None:
    bundle_id = opened.header.bundle_id
    copy = folders.accepted / f"{bundle_id}.sob"
    atomic_write_bytes(copy, path.read_bytes())
    entry = json.dumps(_registry_entry(opened, ev, now), indent=2, sort_keys=True) + "\n"
    atomic_write_bytes(folders.accepted / f"{bundle_id}.json", entry.encode("ascii"))
    opened.record_in(ledger, now)  # only after the copy is durable
    path.unlink()


def _quarantine(path: Path, error: SecureOneshotError, folders: IngestFolders, now: datetime) -> None:
    reason = {"file": path.name, "quarantined_at": format_time(now), "error": type(error).__name__,
              "exit_code": error.exit_code, "message": error.message, "hint": error.hint, **error.data}
    target = folders.quarantine / path.name
    if target.exists():  # keep both: never overwrite evidence
        target = folders.quarantine / f"{path.stem}.{format_time(now).replace(':', '')}{path.suffix}"
    atomic_write_bytes(target.with_name(target.name + ".reason.json"), (json.dumps(reason, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    shutil.move(os.fspath(path), os.fspath(target))


def _ingest_one(path: Path, ctx: _Context) -> BundleOutcome:
    try:
        ctx.ledger.check(inspect_bundle(path).bundle_id)
        options = VerifyOptions(max_payload_bytes=ctx.policy.max_bundle_bytes)
        opened = open_bundle(path, ctx.identity, ctx.trust, now=ctx.now, options=options)
        ev = _check_policy(ctx.policy, opened)
        _accept(path, opened, ev, ctx.folders, ctx.ledger, ctx.now)
    except SecureOneshotError as error:
        _quarantine(path, error, ctx.folders, ctx.now)
        return BundleOutcome(path.name, "quarantined", error=type(error).__name__, reason=error.message,
                             decisions=error.data.get("decisions", []))
    return BundleOutcome(path.name, "accepted", opened.header.bundle_id, opened.header.sender)


@dataclass
class _Context:
    identity: Identity
    trust: TrustStore
    policy: IngestPolicy
    folders: IngestFolders
    ledger: ReplayLedger
    now: datetime


def _audit(ctx: _Context, outcome: BundleOutcome) -> None:
    event = audit.AuditEvent(
        action="ingest", outcome="ok" if outcome.outcome == "accepted" else "refused",
        reason=outcome.reason or "accepted", bundle_id=outcome.bundle_id, policy_id=ctx.policy.id,
        policy_version=ctx.policy.version, policy_sha256=ctx.policy.sha256,
        details={"file": outcome.file, "sender": outcome.sender, "error": outcome.error},
    )
    audit.append_event(ctx.folders.audit_log, ctx.identity, event, ctx.now)


def ingest_inbox(folders: IngestFolders, identity: Identity, trust: TrustStore, policy: IngestPolicy, now: datetime | None = None) -> list[BundleOutcome]:
    """Process every ``*.sob`` in the inbox (see module docstring); returns one outcome per file."""
    for folder in (folders.accepted, folders.quarantine):
        folder.mkdir(parents=True, exist_ok=True)
    ledger = ReplayLedger(folders.ledger)
    ctx = _Context(identity, trust, policy, folders, ledger, (now or utc_now()))
    outcomes = []
    for path in sorted(folders.inbox.glob("*.sob")):
        outcome = _ingest_one(path, ctx)
        _audit(ctx, outcome)
        outcomes.append(outcome)
    ledger.close()
    return outcomes
