"""``export``: the policy-checked, audited way weights leave a site.

Steps: verify the site's audit log -> load the policy and count approver
signatures -> look up the highest policy version used here (no rollback) ->
load the model directory -> evaluate every decision -> refuse (audit record,
no bundle) or seal exactly the allowed tensors with the policy bound into the
signed manifest (audit record).  ``dry_run`` evaluates without writing a bundle
or an audit record.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from .. import audit
from .._internal.encoding import utc_now
from ..bundle import SealResult, seal_tensors
from ..errors import PolicyViolationError, PrivacyError, SecureOneshotError
from ..keys import Identity, PublicIdentity, TrustStore
from ..policy.artifacts import ExportCandidate, artifact_of, load_model_dir
from ..policy.evaluate import Evaluation, ExportContext, evaluate_export
from ..policy.explain import decision_table, denial_summary, evaluation_json
from ..policy.load import load_export_policy
from ..policy.model import ExportPolicy
from ..policy.signatures import count_approvals

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


@dataclass
class ExportReport:
    policy: ExportPolicy
    evaluation: Evaluation
    tensors: list[str]
    bundle: SealResult | None = None
    epsilons: dict[str, float] = field(default_factory=dict)


def highest_policy_version(records: Sequence[audit.AuditRecord], policy_id: str) -> int | None:
    """The highest version of ``policy_id`` that an export at this site used (from its audit log)."""
    versions = [r.event.policy_version for r in records
                if r.event.action == "export" and r.event.outcome == "ok" and r.event.policy_id == policy_id and r.event.policy_version is not None]
    return max(versions, default=None)


def _no_floats(value: Any) -> Any:
    """Signed JSON carries reals as decimal strings (FORMAT.md 1)."""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, dict):
        return {str(k): _no_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_no_floats(v) for v in value]
    return value


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
    error_class = PrivacyError if any(d.kind == "dp" for d in ev.denied) else PolicyViolationError
    return error_class(
        f"export refused by policy {policy.id} v{policy.version}: {summary}",
        hint="nothing was sent; fix the model or ask the privacy office about the policy (table below)",
        details=["decisions:", *decision_table(ev.decisions)],
        data={"evaluation": evaluation_json(ev)},
    )


def _sent_dp(candidate: ExportCandidate, tensors: list[str]) -> dict[str, Any]:
    sent = {artifact_of(n) for n in tensors}
    return {a: r.to_json() for a, r in candidate.dp.items() if a in sent}


def _seal(req: ExportRequest, policy: ExportPolicy, candidate: ExportCandidate, ev: Evaluation) -> SealResult:
    names = ev.allowed_tensors()
    sent = sorted({artifact_of(n) for n in names})
    meta = {
        "policy_version": policy.version,
        "site": candidate.site,
        "artifacts": {a: _no_floats(candidate.artifacts_meta.get(a, {})) for a in sent},
        "recomputed_epsilon": {k: repr(v) for k, v in ev.epsilons.items()},
    }
    return seal_tensors(
        {n: candidate.tensors[n] for n in names}, req.out, sender=req.sender, recipients=list(req.recipients),
        policy_id=policy.id, policy_sha256=policy.sha256, dp=_sent_dp(candidate, names), meta=meta,
        valid_for=timedelta(days=policy.valid_days), now=req.now,
    )


def export_model(req: ExportRequest) -> ExportReport:
    """Run the export (see module docstring).

    Raises:
        AuditLogError: the site's audit log fails verification (nothing is exported).
        ConfigError: invalid policy or model record.
        PolicyViolationError / PrivacyError: something was denied (the error carries the decision table).
    """
    now = req.now or utc_now()
    records = audit.verify_log(req.audit_log, req.sender.public) if os.path.exists(req.audit_log) else []
    policy = load_export_policy(req.policy_path)
    approvals, _ = count_approvals(policy, req.policy_path, req.trust, now)
    candidate = load_model_dir(req.model_dir).without(set(req.without))
    ctx = ExportContext(now, tuple(r.key_id for r in req.recipients), approvals, highest_policy_version(records, policy.id), req.min_approvals)
    ev = evaluate_export(policy, candidate, ctx)
    if not ev.allowed:
        raise _refuse(req, policy, ev)
    report = ExportReport(policy, ev, ev.allowed_tensors(), epsilons=dict(ev.epsilons))
    if req.dry_run:
        return report
    report.bundle = _seal(req, policy, candidate, ev)
    m = report.bundle.manifest
    audit.append_event(req.audit_log, req.sender, _event(
        req, policy, "ok", f"sent {len(report.tensors)} tensors ({m.payload_size} bytes)",
        bundle_id=m.bundle_id, payload_sha256=m.payload_sha256, dp={a: r["epsilon"] for a, r in m.dp.items()},
        details={"tensors": len(report.tensors), "expires": m.expires},
    ), req.now)
    return report
