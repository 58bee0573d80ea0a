"""The site's own check of a task result before it leaves, without NVFlare (the filter in ``site_filter`` calls it).

A result may leave only if it is one of exactly two things:

* a refusal: no parameters, and meta ``{"status": "refused", "reason": <one line>}`` (nothing else is kept);
* a bundle this site exported: exactly one parameter ``bundle``, a 1-D uint8 array holding a file that

  1. parses as a bundle (magic, strict public header, MAC and stream lengths consistent with the file's length);
  2. names this site's own key as its sender, and exactly the recipients the site's settings name;
  3. appears in the site's audit log (its hash chain and signatures verified with the site's own public key) as an
     ``export`` with outcome ``ok`` and this ``bundle_id``, under the policy id in the public header and the SHA-256
     of the export policy file the site's settings name today (the policy the site accepts);
  4. is byte for byte the file that export wrote to the site's outbox (the audit record names it).

The manifest signature itself is inside the encrypted stream: only a recipient (the server) can read it, so the
site cannot re-verify it from the bytes.  Checks 3 and 4 stand in for it: the site's signed audit record says its
own export produced and signed this bundle, and the bytes are that export's output, unchanged.  Nothing here needs
the server's private key.  What leaves is rebuilt from what was checked: the bytes and the header fields read from
them; any other meta or parameter a client script added is dropped.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import Any

import numpy as np

from ... import audit
from ...bundle.inspect import read_header
from ...errors import PolicyViolationError, SecureOneshotError
from ...keys import load_public
from ..site_export import SiteSettings, public_header, site_identity
from . import BUNDLE_PARAM, REASON_KEY, STATUS_KEY
from .site import MAX_REASON_CHARS

__all__ = ["check_result", "ResultBlocked"]


class ResultBlocked(PolicyViolationError):
    """The site's result filter kept a task result from leaving."""


def _blocked(why: str) -> ResultBlocked:
    return ResultBlocked(f"task result blocked by the site's filter: {why}",
                         hint="only a refusal or a bundle this site exported under its own policy may leave")


def _refusal(params: Mapping[str, Any], meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    if params:
        raise _blocked("a refusal carries parameters")
    reason = meta.get(REASON_KEY)
    if not isinstance(reason, str):
        raise _blocked("a refusal without a reason string")
    return {}, {STATUS_KEY: "refused", REASON_KEY: " ".join(reason.split())[:MAX_REASON_CHARS]}


def _bundle_bytes(params: Mapping[str, Any]) -> bytes:
    if set(params) != {BUNDLE_PARAM}:
        raise _blocked(f"expected exactly one parameter {BUNDLE_PARAM!r}, got {len(params)}")
    value = params[BUNDLE_PARAM]
    if isinstance(value, bytes):
        return value
    if not isinstance(value, np.ndarray) or value.dtype != np.uint8 or value.ndim != 1:
        raise _blocked(f"parameter {BUNDLE_PARAM!r} is not a 1-D uint8 array")
    return value.tobytes()


def _export_record(settings: SiteSettings, bundle_id: str, public) -> audit.AuditEvent:
    for record in reversed(audit.verify_log(settings.audit_log, public)):
        e = record.event
        if e.action == "export" and e.outcome == "ok" and e.bundle_id == bundle_id:
            return e
    raise _blocked(f"bundle {bundle_id} is not an export this site's audit log records")


def _sha256_file(path) -> bytes | None:
    try:
        return hashlib.sha256(path.read_bytes()).digest() if path.is_file() else None
    except OSError:
        return None


def check_result(settings: SiteSettings, params: Mapping[str, Any] | None, meta: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (params, meta) allowed to leave, rebuilt from what was checked (module docstring), or ``ResultBlocked``.

    Raises:
        ResultBlocked: the result is neither a refusal nor a bundle this site exported under its policy.
        SecureOneshotError: the site's own key, recipients or audit log cannot be read (nothing leaves either).
    """
    params = params or {}
    status = meta.get(STATUS_KEY)
    if status == "refused":
        return _refusal(params, meta)
    if status != "bundle":
        raise _blocked("not a secure-oneshot reply (no status 'bundle' or 'refused')")
    data = _bundle_bytes(params)
    try:
        header = read_header(io.BytesIO(data)).header
    except SecureOneshotError as e:
        raise _blocked(f"not a bundle ({type(e).__name__}: {e.message})") from None
    public = site_identity(settings).public
    if header.sender != public.key_id:
        raise _blocked(f"the bundle's sender {header.sender[:40]} is not this site's key {public.key_id}")
    recipients = {load_public(p).key_id for p in settings.recipients}
    if set(header.recipient_ids) != recipients or len(header.recipient_ids) != len(recipients):
        raise _blocked("the bundle's recipients are not the ones the site's settings name")
    event = _export_record(settings, header.bundle_id, public)
    policy_sha = _sha256_file(settings.policy)
    if event.policy_id != header.policy_id or policy_sha is None or event.policy_sha256 != policy_sha.hex():
        raise _blocked(f"bundle {header.bundle_id} was not exported under the site's export policy {settings.policy.name}")
    out = event.details.get("out") if isinstance(event.details, Mapping) else None
    written = settings.outbox / out if isinstance(out, str) and out and "/" not in out and out not in (".", "..") else None
    if written is None or _sha256_file(written) != hashlib.sha256(data).digest():
        raise _blocked(f"bundle {header.bundle_id} is not byte for byte the file the site's export wrote")
    return {BUNDLE_PARAM: np.frombuffer(data, dtype=np.uint8)}, {STATUS_KEY: "bundle", **public_header(header)}
