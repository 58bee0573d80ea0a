"""Evaluate a policy into decisions: per tensor, per artifact, per rule, each allowed or denied with a reason.

Pure: takes the policy, the candidate and a context (time, recipients,
approvals, versions already used) and returns an :class:`Evaluation`.  Every
violation is collected; nothing stops at the first.  Callers decide what to do
with a denial (``export`` refuses; ``policy explain`` prints the table).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from ..bundle.safetensors_strict import serialize_tensors
from ..errors import PrivacyError
from .artifacts import ExportCandidate
from .dp import DpRecord, composed_epsilon, group_by_dataset, verify_claim
from .metadata import MetadataReview, review_metadata, review_received
from .model import DpLimit, ExportPolicy, IngestPolicy
from .structure import UNKNOWN, Classification, classify_tensors

__all__ = ["Decision", "Evaluation", "ExportContext", "evaluate_export", "evaluate_ingest", "dtype_code"]



def dtype_code(tensor: Any) -> str:
    """The safetensors dtype code of a NumPy array or torch tensor (``bundle.arrays.dtype_code``)."""
    from ..bundle.arrays import dtype_code as code_of   # NumPy only once there are tensors to judge

    return code_of(tensor)


@dataclass(frozen=True)
class Decision:
    """One line of the explain table."""

    kind: str       # "policy" | "recipient" | "artifact" | "structure" | "metadata" | "dp" | "tensor" | "bundle"
    subject: str    # what was judged: a tensor name, an artifact, a key id, ...
    rule: str       # the policy key that decided, e.g. "artifacts.bn_statistics" or "tensors[1]"
    allowed: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "subject": self.subject, "rule": self.rule, "allowed": self.allowed, "reason": self.reason}


@dataclass
class Evaluation:
    """All decisions plus the recomputed epsilons (artifact -> epsilon; "composed:<fingerprint>" for compositions)
    and the metadata review (what of the model record would go into the manifest)."""

    decisions: list[Decision] = field(default_factory=list)
    epsilons: dict[str, float] = field(default_factory=dict)
    payload_bytes: int = 0
    metadata: MetadataReview | None = None

    @property
    def allowed(self) -> bool:
        return all(d.allowed for d in self.decisions)

    @property
    def denied(self) -> list[Decision]:
        return [d for d in self.decisions if not d.allowed]

    def allowed_tensors(self) -> list[str]:
        return [d.subject for d in self.decisions if d.kind == "tensor" and d.allowed]

    def add(self, kind: str, subject: str, rule: str, allowed: bool, reason: str) -> None:
        self.decisions.append(Decision(kind, subject, rule, allowed, reason))


@dataclass(frozen=True)
class ExportContext:
    """Facts about this export that are not in the policy or the model."""

    now: datetime
    recipients: tuple[str, ...]
    approvals: int                      # valid approver signatures on this exact policy file
    highest_version_used: int | None    # highest version of this policy id used before at this site
    min_approvals: int = 0              # the site's own floor: a policy cannot lower it by requiring fewer


# --- DP ----------------------------------------------------------------------------------------


def _at_most(value: float, limit: float) -> bool:
    """``value <= limit`` up to float rounding: 3 x 1e-5 must meet a 3e-5 limit."""
    return value <= limit * (1 + 1e-9)


def _check_limit(ev: Evaluation, artifact: str, record: DpRecord, epsilon: float, limit: DpLimit, rule: str) -> None:
    checks = [
        ("max_epsilon", epsilon <= limit.max_epsilon, f"recomputed epsilon {epsilon:.3g} vs limit {limit.max_epsilon:g}"),
        ("max_delta", _at_most(record.delta, limit.max_delta), f"delta {record.delta:g} vs limit {limit.max_delta:g}"),
        ("accountants", record.accountant in limit.accountants, f"accountant {record.accountant!r}, allowed {list(limit.accountants)}"),
    ]
    if limit.require_poisson:
        checks.append(("require_poisson", record.sampling == "poisson", f"sampling {record.sampling!r}; Poisson sampling required"))
    for key, ok, reason in checks:
        ev.add("dp", artifact, f"{rule}.{key}", ok, reason)


def _verified_epsilon(ev: Evaluation, artifact: str, record: DpRecord) -> float | None:
    """Recompute the claim with Opacus; a disagreeing claim is a denial, not an exception."""
    try:
        epsilon = verify_claim(record)
    except PrivacyError as e:
        ev.add("dp", artifact, f"dp.{artifact}", False, e.message)
        return None
    ev.epsilons[artifact] = epsilon
    ev.add("dp", artifact, f"dp.{artifact}", True, f"claimed epsilon {record.epsilon:.3g} matches the recomputed {epsilon:.3g} ({record.accountant})")
    return epsilon


def _check_dp(ev: Evaluation, records: dict[str, DpRecord], limits: dict[str, DpLimit]) -> None:
    for artifact, record in sorted(records.items()):
        epsilon = _verified_epsilon(ev, artifact, record)
        if epsilon is not None and artifact in limits:
            _check_limit(ev, artifact, record, epsilon, limits[artifact], f"dp.{artifact}")


def _check_composition(ev: Evaluation, records: dict[str, DpRecord], limit: DpLimit | None) -> None:
    """Artifacts trained on the same records spend one budget: compose them and check the total."""
    if limit is None:
        return
    for fingerprint, names in group_by_dataset(records).items():
        if len(names) < 2:
            continue
        group = [records[n] for n in names]
        delta = sum(r.delta for r in group)
        subject = "+".join(names)
        try:
            epsilon = composed_epsilon(group, delta)
        except PrivacyError as e:  # e.g. a history Opacus cannot evaluate: a denial, not a crash
            ev.add("dp", subject, "dp.composed", False, e.message)
            continue
        ev.epsilons[f"composed:{fingerprint}"] = epsilon
        ev.add("dp", subject, "dp.composed.max_epsilon", epsilon <= limit.max_epsilon,
               f"composed epsilon {epsilon:.3g} (same records {fingerprint[:12]}) vs limit {limit.max_epsilon:g}")
        ev.add("dp", subject, "dp.composed.max_delta", _at_most(delta, limit.max_delta), f"composed delta {delta:g} vs limit {limit.max_delta:g}")


# --- export ------------------------------------------------------------------------------------


def _check_policy_state(ev: Evaluation, policy: ExportPolicy, ctx: ExportContext) -> None:
    ev.add("policy", policy.id, "effective", ctx.now >= policy.effective, f"effective from {policy.effective:%Y-%m-%d %H:%M}Z")
    ev.add("policy", policy.id, "expires", ctx.now < policy.expires, f"expires {policy.expires:%Y-%m-%d %H:%M}Z")
    required = max(policy.approvals_required, ctx.min_approvals)
    floor = f" (the site requires at least {ctx.min_approvals})" if ctx.min_approvals > policy.approvals_required else ""
    ev.add("policy", policy.id, "approval.required", ctx.approvals >= required,
           f"{ctx.approvals} valid approver signature(s), {required} required{floor}")
    seen = ctx.highest_version_used
    ev.add("policy", policy.id, "version", seen is None or policy.version >= seen,
           f"version {policy.version}" + ("" if seen is None else f"; version {seen} was already used here (no rollback)"))


def _check_recipients(ev: Evaluation, policy: ExportPolicy, recipients: Sequence[str]) -> None:
    for key_id in recipients:
        ok = key_id in policy.recipients
        ev.add("recipient", key_id, "recipients.allowed", ok, "listed" if ok else "not in recipients.allowed")


def _check_artifacts(ev: Evaluation, policy: ExportPolicy, candidate: ExportCandidate) -> set[str]:
    """Artifact-level decisions; returns the artifacts that may leave."""
    permitted = set()
    for artifact in sorted(candidate.artifacts()):
        if artifact == UNKNOWN:
            ev.add("artifact", artifact, "structure", False, "tensors no declared architecture defines never leave")
            continue
        mode = policy.artifacts.get(artifact, "deny")
        has_dp = artifact in candidate.dp
        ok = mode == "allow" or (mode == "allow-with-dp" and has_dp)
        reason = {"allow": "allowed" if has_dp else "allowed (no DP record: it leaves without a DP guarantee)", "deny": "denied by policy", "allow-with-dp": "allowed only with DP: " + ("DP record present" if has_dp else "no DP record")}[mode]
        ev.add("artifact", artifact, f"artifacts.{artifact}", ok, reason)
        if ok:
            permitted.add(artifact)
    return permitted


def _tensor_decision(policy: ExportPolicy, name: str, tensor: Any, artifact: str) -> tuple[str, bool, str]:
    nbytes, code = int(tensor.nbytes), dtype_code(tensor)
    for rule in policy.tensors:
        if rule.artifact != artifact or not any(fnmatch.fnmatchcase(name, p) for p in rule.names):
            continue
        if code not in rule.dtypes:
            return f"tensors[{rule.index}]", False, f"dtype {code} not in {list(rule.dtypes)}"
        if nbytes > rule.max_bytes:
            return f"tensors[{rule.index}]", False, f"{nbytes} bytes > max_bytes {rule.max_bytes}"
        return f"tensors[{rule.index}]", True, f"{code}, {nbytes} bytes"
    return "tensors", False, "no [[tensors]] rule allows it (allow-list)"


def _check_structure(ev: Evaluation, classification: Classification) -> None:
    """Missing tensors, shape/dtype mismatches and undescribable metadata: each a denial."""
    for section, note in sorted(classification.notes.items()):
        ev.add("structure", section, "structure", False, note)
    for subject, reason in classification.problems:
        ev.add("structure", subject, "structure", False, reason)


def _check_metadata(ev: Evaluation, review: MetadataReview) -> None:
    ev.metadata = review
    for f in review.fields:
        ev.add("metadata", f.path, "metadata", f.allowed, f"{f.value}: {f.outcome} ({f.reason})")


def _check_tensors(ev: Evaluation, policy: ExportPolicy, candidate: ExportCandidate, permitted: set[str]) -> None:
    for name, tensor in sorted(candidate.tensors.items()):
        artifact = candidate.artifact_of(name)
        if artifact == UNKNOWN:
            ev.add("tensor", name, "structure", False, "the declared architecture defines no such tensor")
            continue
        if artifact not in permitted:
            ev.add("tensor", name, f"artifacts.{artifact}", False, f"artifact {artifact} may not leave")
            continue
        ev.add("tensor", name, *_tensor_decision(policy, name, tensor, artifact))


def payload_size(tensors: dict[str, Any]) -> int:
    """Exact safetensors size of ``tensors`` (no copy: the writer returns views)."""
    return sum(len(segment) for segment in serialize_tensors(tensors))


def evaluate_export(policy: ExportPolicy, candidate: ExportCandidate, ctx: ExportContext) -> Evaluation:
    """Every decision for sending ``candidate`` under ``policy``; nothing is skipped after a denial."""
    ev = Evaluation()
    _check_policy_state(ev, policy, ctx)
    _check_recipients(ev, policy, ctx.recipients)
    permitted = _check_artifacts(ev, policy, candidate)
    _check_structure(ev, candidate.classification)
    # DP records of artifacts that may leave: no accountant work for what is refused anyway.
    records = {a: r for a, r in candidate.dp.items() if a in permitted}
    _check_dp(ev, records, policy.dp)
    _check_composition(ev, records, policy.composed_dp)
    _check_tensors(ev, policy, candidate, permitted)
    sending = {candidate.artifact_of(n) for n in ev.allowed_tensors()}
    _check_metadata(ev, review_metadata(candidate.artifacts_meta, candidate.site, sending))
    allowed = {n: candidate.tensors[n] for n in ev.allowed_tensors()}
    ev.payload_bytes = payload_size(allowed)
    ev.add("bundle", "payload", "bundle.max_bytes", ev.payload_bytes <= policy.max_bundle_bytes,
           f"{ev.payload_bytes} bytes vs limit {policy.max_bundle_bytes}")
    return ev


# --- ingest ------------------------------------------------------------------------------------


MANIFEST_META_KEYS = ("policy_version", "site", "artifacts", "recomputed_epsilon", "site_policy", "privacy_statement", "request_id")
REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:-]{1,64}")  # meta.request_id: the id of the request a bundle answers
"""The keys ``export`` writes into a manifest's ``meta``; a received bundle with any other key is refused."""


def _architecture(meta: Mapping[str, Any], artifact: str) -> str:
    entry = meta.get("artifacts", {})
    info = entry.get(artifact, {}) if isinstance(entry, dict) else {}
    return str(info.get("architecture", "")) if isinstance(info, dict) else ""


def evaluate_ingest(policy: IngestPolicy, sender: str, tensors: Mapping[str, Any], dp: dict[str, DpRecord],
                    meta: Mapping[str, Any], payload_bytes: int) -> Evaluation:
    """Decisions for accepting an already verified bundle at the server.

    The received tensors are classified by structure against the architectures the manifest declares, with the
    same rules as at the site: an unknown tensor, a missing one or a shape/dtype mismatch is a denial.
    """
    ev = Evaluation(payload_bytes=payload_bytes)
    meta = meta if isinstance(meta, dict) else {}
    ev.add("policy", sender, "senders.allowed", sender in policy.senders, "listed" if sender in policy.senders else "sender not in senders.allowed")
    for key in sorted(set(meta) - set(MANIFEST_META_KEYS)):
        ev.add("metadata", f"meta.{key}", "metadata", False, "not a field export writes")
    if "request_id" in meta and not (isinstance(meta["request_id"], str) and REQUEST_ID_RE.fullmatch(meta["request_id"])):
        ev.add("metadata", "meta.request_id", "metadata", False, "not 1..64 characters of [A-Za-z0-9._:-]")
    classification = classify_tensors(tensors, meta.get("artifacts", {}))
    _check_structure(ev, classification)
    present = sorted(set(classification.artifacts.values()))
    _check_metadata(ev, review_received(meta, set(present) - {UNKNOWN}))
    for artifact in policy.required_artifacts:
        ev.add("artifact", artifact, "artifacts.required", artifact in present, "present" if artifact in present else "required but missing")
    refused = set()
    for artifact in present:
        denied = artifact in policy.denied_artifacts or artifact == UNKNOWN
        reason = "tensors no declared architecture defines" if artifact == UNKNOWN else "denied at this server" if denied else "accepted"
        ev.add("artifact", artifact, "structure" if artifact == UNKNOWN else "artifacts.denied", not denied, reason)
        if denied:
            refused.add(artifact)
        if artifact in policy.require_dp and artifact not in dp:
            ev.add("dp", artifact, "artifacts.require_dp", False, "DP required but the bundle has no DP record for it")
        if artifact in ("classifier", "generator"):
            arch = _architecture(meta, artifact)
            ev.add("artifact", artifact, "models.architectures", arch in policy.architectures, f"architecture {arch or '(none)'!r}")
    for name in sorted(n for n, a in classification.artifacts.items() if a == UNKNOWN):
        ev.add("tensor", name, "structure", False, "the declared architecture defines no such tensor")
    _check_dp(ev, {a: r for a, r in dp.items() if a in present and a not in refused}, policy.dp)
    ev.add("bundle", "payload", "limits.max_bundle_bytes", payload_bytes <= policy.max_bundle_bytes, f"{payload_bytes} bytes")
    ev.add("bundle", "payload", "limits.max_tensors", len(tensors) <= policy.max_tensors, f"{len(tensors)} tensors")
    biggest = max((int(t.nbytes) for t in tensors.values()), default=0)
    ev.add("bundle", "payload", "limits.max_tensor_bytes", biggest <= policy.max_tensor_bytes, f"largest tensor {biggest} bytes")
    return ev
