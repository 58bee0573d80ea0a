"""``export``: the policy-checked, audited way weights leave a site.

Steps: verify the site's audit log -> read the policy's bytes once, load it
and count approver signatures -> look up the highest policy version used here
(no rollback) -> load the model directory -> evaluate every decision
(structure, metadata allow-list, DP, tensors) -> refuse (audit record, no
bundle) or seal exactly the allowed tensors and allow-listed metadata, with the
policy's hash, its exact text and its approvals in the signed manifest
(``meta.site_policy``) and the privacy statement (``meta.privacy_statement``,
``bundle/PRIVACY_STATEMENT.md``: what leaves, under which guarantee, composed
with the site's earlier releases of the same data read from the audit log,
whose export records therefore carry the released DP records), then record
it.  The policy's ``[privacy_statement]`` requirements are decisions like any
other: unmet, the export is refused.  ``dry_run`` evaluates without writing
a bundle or an audit record.

Bundle and audit record are one act: the bundle is sealed under a temporary
name beside ``out`` (``.{name}.{pid}.{hex}.tmp``, the pattern of
``_internal.atomic``), the audit record is appended (fsynced by the audit
module), and only then is the bundle renamed to ``out`` and the directory
fsynced.  Any failure removes the temporary: no bundle is ever left at ``out``
without its audit record.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .. import audit
from .._internal.atomic import fsync_dir, temporary_beside
from .._internal.encoding import utc_now
from .privacy_statement import PRIVACY_AUDIT_FILE, build_statement, read_privacy_audit, requirement_decisions
from ..bundle import SealResult, seal_tensors
from ..errors import ConfigError, PolicyViolationError, PrivacyError, ResourceError, SecureOneshotError
from ..keys import Identity, PublicIdentity, TrustStore
from ..policy.artifacts import ExportCandidate, load_model_dir
from ..policy.evaluate import REQUEST_ID_RE, Evaluation, ExportContext, evaluate_export
from ..policy.explain import decision_table, denial_summary, evaluation_json, metadata_table
from ..policy.load import policy_from_bytes, read_policy_bytes
from ..policy.model import ExportPolicy
from ..policy.signatures import count_entry_approvals, read_signature_entries
from ..policy.site_policy import site_policy_meta

__all__ = ["ExportRequest", "ExportReport", "export_model", "highest_policy_version"]


@dataclass(frozen=True)
class ExportRequest:
    """Everything ``export`` needs; see ``secure-oneshot export --help``."""

    model_dir: Path
    policy_path: Path
    sender: Identity
    recipients: Sequence[PublicIdentity]
    out: Path
    audit_log: Path
    trust: TrustStore
    without: frozenset[str] = frozenset()
    min_approvals: int = 0
    dry_run: bool = False
    now: datetime | None = None
    privacy_audit: Path | None = None   # the audit-privacy JSON report; default MODEL_DIR/privacy_audit.json when present
    request_id: str = ""                # a requester's id bound into the manifest (meta.request_id, FORMAT.md 4.4); "" for none


@dataclass
class ExportReport:
    policy: ExportPolicy
    evaluation: Evaluation
    tensors: list[str]
    bundle: SealResult | None = None
    epsilons: dict[str, float] = field(default_factory=dict)
    statement: dict[str, Any] | None = None   # the privacy statement signed into the manifest


def highest_policy_version(records: Sequence[audit.AuditRecord], policy_id: str) -> int | None:
    """The highest version of ``policy_id`` that an export at this site used (from its audit log)."""
    versions = [r.event.policy_version for r in records
                if r.event.action == "export" and r.event.outcome == "ok" and r.event.policy_id == policy_id and r.event.policy_version is not None]
    return max(versions, default=None)


def _event(req: ExportRequest, policy: ExportPolicy, outcome: str, reason: str, **extra: Any) -> audit.AuditEvent:
    return audit.AuditEvent(
        action="export", outcome=outcome, reason=reason, policy_id=policy.id, policy_version=policy.version,
        policy_sha256=policy.sha256, recipients=tuple(r.key_id for r in req.recipients), **extra,
    )


def _refuse(req: ExportRequest, policy: ExportPolicy, ev: Evaluation) -> SecureOneshotError:
    summary = denial_summary(ev)
    if not req.dry_run:
        denied = [d.to_json() for d in ev.denied]
        audit.append_event(req.audit_log, req.sender, _event(req, policy, "refused", summary, details={"denied": denied}), req.now)
    error_class = PrivacyError if any(d.kind in ("dp", "statement") for d in ev.denied) else PolicyViolationError
    return error_class(
        f"export refused by policy {policy.id} v{policy.version}: {summary}",
        hint="nothing was sent; fix the model or ask the privacy office about the policy (table below)",
        details=["decisions:", *decision_table(ev.decisions), *metadata_table(ev)],
        data={"evaluation": evaluation_json(ev)},
    )


def _sent_dp(candidate: ExportCandidate, tensors: list[str]) -> dict[str, Any]:
    sent = {candidate.artifact_of(n) for n in tensors}
    return {a: r.to_json() for a, r in candidate.dp.items() if a in sent}


@dataclass(frozen=True)
class _PolicySource:
    """The policy as read once: its exact bytes (which travel in the bundle) and its signature entries."""

    policy: ExportPolicy
    raw: bytes
    signatures: list[dict[str, str]]


def _read_policy(path: Path) -> _PolicySource:
    raw = read_policy_bytes(path)
    policy = policy_from_bytes(raw, str(path))
    if not isinstance(policy, ExportPolicy):
        raise ConfigError(f"{path} is a server ingest policy, not a site export policy")
    return _PolicySource(policy, raw, read_signature_entries(path))


def _seal(req: ExportRequest, source: _PolicySource, candidate: ExportCandidate, ev: Evaluation, path: Path,
          statement: dict[str, Any]) -> SealResult:
    policy = source.policy
    names = ev.allowed_tensors()
    assert ev.metadata is not None  # evaluate_export always reviews the metadata
    meta = {
        "policy_version": policy.version,
        **ev.metadata.sent,
        "recomputed_epsilon": {k: repr(v) for k, v in ev.epsilons.items()},
        "site_policy": site_policy_meta(policy, source.raw, source.signatures),
        "privacy_statement": statement,
        **({"request_id": req.request_id} if req.request_id else {}),
    }
    return seal_tensors(
        {n: candidate.tensors[n] for n in names}, path, sender=req.sender, recipients=list(req.recipients),
        policy_id=policy.id, policy_sha256=policy.sha256, dp=_sent_dp(candidate, names), meta=meta,
        valid_for=timedelta(days=policy.valid_days), now=req.now,
    )


def _seal_and_record(req: ExportRequest, source: _PolicySource, candidate: ExportCandidate, report: ExportReport) -> None:
    """Seal to a temporary beside ``out``, append the audit record, then rename: one act (module docstring)."""
    out = Path(req.out)
    temporary = temporary_beside(out)
    try:
        assert report.statement is not None
        sealed = _seal(req, source, candidate, report.evaluation, temporary, report.statement)
        m = sealed.manifest
        audit.append_event(req.audit_log, req.sender, _event(
            req, source.policy, "ok", f"sent {len(report.tensors)} tensors ({m.payload_size} bytes)",
            bundle_id=m.bundle_id, payload_sha256=m.payload_sha256, dp={a: r["epsilon"] for a, r in m.dp.items()},
            details={"tensors": len(report.tensors), "expires": m.expires, "out": out.name, "request_id": req.request_id,
                     "dp_records": m.dp},  # what later statements compose with (earlier releases of the same data)
        ), req.now)
        try:
            os.replace(temporary, out)
            fsync_dir(out.parent if str(out.parent) else Path("."))
        except OSError as e:
            raise ResourceError(f"cannot move the sealed bundle to {out}: {e.strerror}",
                                hint="the audit log records a bundle id that was not delivered; check the folder and export again") from e
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise
    report.bundle = SealResult(out, sealed.header, sealed.manifest)


def _statement(req: ExportRequest, policy: ExportPolicy, candidate: ExportCandidate, ev: Evaluation, now: datetime,
               records: Sequence[audit.AuditRecord]) -> dict[str, Any] | None:
    """Build the privacy statement and judge the policy's requirements on it (decisions of kind "statement")."""
    audit_path = req.privacy_audit if req.privacy_audit is not None else Path(req.model_dir) / PRIVACY_AUDIT_FILE
    report = read_privacy_audit(Path(audit_path))
    if req.privacy_audit is not None and report is None:
        raise ConfigError(f"privacy audit report {audit_path} not found", hint="run `secure-oneshot audit-privacy --out FILE.json` first")
    try:
        statement = build_statement(policy, candidate, ev, now=now, earlier=records, audit_report=report)
    except PrivacyError as e:  # e.g. an earlier release's history the accountant cannot evaluate: refused, not a crash
        ev.add("statement", "privacy_statement", "privacy_statement", False, f"cannot build the privacy statement: {e.message}")
        return None
    ev.add("statement", "privacy_statement", "privacy_statement", True, "built and valid against its schema")
    for subject, rule, ok, reason in requirement_decisions(policy.privacy_statement, statement):
        ev.add("statement", subject, rule, ok, reason)
    return statement


def export_model(req: ExportRequest) -> ExportReport:
    """Run the export (see module docstring).

    Raises:
        AuditLogError: the site's audit log fails verification (nothing is exported).
        ConfigError: invalid policy or model record.
        PolicyViolationError / PrivacyError: something was denied (the error carries the decision table).
    """
    if req.request_id and not REQUEST_ID_RE.fullmatch(req.request_id):
        raise ConfigError(f"request id {req.request_id!r} is not 1..64 characters of [A-Za-z0-9._:-]")
    now = req.now or utc_now()
    req = replace(req, now=now)   # the statement's export time and the bundle's `created` are the same second
    records = audit.verify_log(req.audit_log, req.sender.public) if os.path.exists(req.audit_log) else []
    source = _read_policy(Path(req.policy_path))
    policy = source.policy
    approvals, _ = count_entry_approvals(policy, source.signatures, req.trust, now)
    candidate = load_model_dir(req.model_dir).without(set(req.without))
    ctx = ExportContext(now, tuple(r.key_id for r in req.recipients), approvals, highest_policy_version(records, policy.id), req.min_approvals)
    ev = evaluate_export(policy, candidate, ctx)
    statement = _statement(req, policy, candidate, ev, now, records) if ev.allowed else None
    if not ev.allowed:
        raise _refuse(req, policy, ev)
    report = ExportReport(policy, ev, ev.allowed_tensors(), epsilons=dict(ev.epsilons), statement=statement)
    if req.dry_run:
        return report
    _seal_and_record(req, source, candidate, report)
    return report
