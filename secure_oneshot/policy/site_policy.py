"""The site's own export policy, carried in the bundle, checked again by the server.

``export`` puts the exact bytes of the signed site export policy and its
approver signatures into the signed manifest (``meta.site_policy``, FORMAT.md).
A server whose ingest policy sets ``require_site_policy = true`` then checks
that the bundle is what that policy allows:

1. the bundle carries a site policy, within the size bounds;
2. it parses (same loader) and its SHA-256 equals the manifest's ``policy_sha256``;
3. the received tensors, metadata and DP records pass the same
   :func:`~.evaluate.evaluate_export` rules, judged at the bundle's creation
   time, with the bundle's recipients (no audit-log rollback check: that log
   stays at the site);
4. enough approvals (``max(min_site_policy_approvals, the policy's own
   approval.required)``) verify against approvers in the *server's* trust
   store.

So an operator holding only the site key cannot release what the site's
approvers did not approve: a hand-sealed bundle carries no policy, and a
policy written by the operator has no approval the server trusts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from .._internal.encoding import parse_time, utc_now
from ..bundle.format import Manifest
from ..errors import ConfigError, PolicyViolationError
from ..keys import TrustStore
from .artifacts import ExportCandidate
from .dp import DpRecord
from .evaluate import Decision, Evaluation, ExportContext, evaluate_export
from .explain import denial_summary
from .load import MAX_POLICY_BYTES, policy_from_bytes
from .model import ExportPolicy, IngestPolicy
from .signatures import MAX_SIGNATURES, approval_entries, count_entry_approvals

__all__ = ["site_policy_meta", "check_site_policy"]


def site_policy_meta(policy: ExportPolicy, policy_bytes: bytes, signature_entries: Sequence[object]) -> dict[str, Any]:
    """The ``meta.site_policy`` object: the policy's exact text and the signatures over it."""
    return {"toml": policy_bytes.decode("utf-8"), "approvals": approval_entries(policy, signature_entries)}


def _refuse(reason: str, decisions: list[Decision] | None = None) -> PolicyViolationError:
    return PolicyViolationError(f"site policy check failed: {reason}",
                                hint="only bundles exported with `secure-oneshot export` under a policy approved by an approver this server trusts are accepted",
                                data={"decisions": [d.to_json() for d in decisions or []]})


def _carried_policy(meta: Mapping[str, Any], policy_sha256: str) -> tuple[ExportPolicy, list[object]]:
    carried = meta.get("site_policy")
    if carried is None:
        raise _refuse("bundle carries no site policy")
    if not isinstance(carried, dict) or set(carried) != {"toml", "approvals"} or not isinstance(carried["toml"], str) \
            or not isinstance(carried["approvals"], list):
        raise _refuse("meta.site_policy must be an object with exactly 'toml' (a string) and 'approvals' (a list)")
    raw = carried["toml"].encode("utf-8", "surrogatepass")
    if len(raw) > MAX_POLICY_BYTES or len(carried["approvals"]) > MAX_SIGNATURES:
        raise _refuse(f"site policy over the bounds ({MAX_POLICY_BYTES} bytes, {MAX_SIGNATURES} approvals)")
    try:
        policy = policy_from_bytes(raw, "<site policy in bundle>")
    except ConfigError as e:
        raise _refuse(f"the carried site policy is invalid ({e.message})") from e
    if not isinstance(policy, ExportPolicy):
        raise _refuse("the carried site policy is not a site export policy")
    if policy.sha256 != policy_sha256:
        raise _refuse("site policy hash differs from the signed manifest")
    return policy, carried["approvals"]


def check_site_policy(ingest: IngestPolicy, manifest: Manifest, tensors: Mapping[str, Any], dp: Mapping[str, DpRecord],
                      trust: TrustStore | None, now: datetime | None = None) -> Evaluation | None:
    """Check a verified bundle against the site policy it carries (module docstring); None when not required.

    ``trust`` is the server's trust store (None counts no approval: fail closed).

    Raises:
        PolicyViolationError: no policy, a hash that differs, a tensor / field / DP record the policy does not
            allow, or too few approvals valid in this server's trust store (the decisions are in ``data``).
    """
    if not ingest.require_site_policy:
        return None
    meta = manifest.meta if isinstance(manifest.meta, dict) else {}
    policy, entries = _carried_policy(meta, manifest.policy_sha256)
    if policy.id != manifest.policy_id:
        raise _refuse(f"site policy id {policy.id!r} differs from the signed manifest's {manifest.policy_id!r}")
    approvals = count_entry_approvals(policy, entries, trust, now or utc_now())[0] if trust is not None else 0
    required = max(policy.approvals_required, ingest.min_site_policy_approvals)
    if approvals < required:
        raise _refuse(f"only {approvals} of {required} required approvals valid in this server's trust store")
    artifacts_meta = meta.get("artifacts", {})
    candidate = ExportCandidate(dict(tensors), dict(dp), artifacts_meta if isinstance(artifacts_meta, dict) else {}, meta.get("site", ""))
    ctx = ExportContext(parse_time(manifest.created), tuple(manifest.recipients), approvals, None, ingest.min_site_policy_approvals)
    ev = evaluate_export(policy, candidate, ctx)
    if not ev.allowed:
        raise _refuse(f"not allowed by the site's own policy {policy.id} v{policy.version}: {denial_summary(ev)}", ev.decisions)
    return ev
