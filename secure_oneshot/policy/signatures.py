"""Approver signatures on policy files: k-of-n, as the policy itself declares.

``policy sign`` appends an Ed25519 signature to ``POLICY.toml.sig`` (JSON);
``policy verify`` and ``export`` count the valid signatures by the policy's
listed approvers, whose public keys must be in the trust store with the role
``approver``.  A signature covers the policy id, version and the SHA-256 of the
exact file bytes, so any edit after signing voids every signature.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.encoding import b64decode, b64encode, canonical_json, format_time, parse_strict_json, utc_now
from ..errors import ConfigError, SecureOneshotError
from ..keys import Identity, TrustStore
from .model import ExportPolicy, IngestPolicy

__all__ = ["SIGNATURES_FORMAT", "MAX_SIGNATURE_FILE_BYTES", "MAX_SIGNATURES", "Approval", "signature_path", "sign_policy",
           "read_signature_entries", "approval_entries", "count_approvals", "count_entry_approvals"]

SIGNATURES_FORMAT = "secure-oneshot-policy-signatures/v1"
MAX_SIGNATURE_FILE_BYTES = 64 * 1024   # a few hundred bytes per signature
MAX_SIGNATURES = 32
_ENTRY_KEYS = ("key_id", "name", "signed_at", "policy_sha256", "signature")
_MAX_FIELD = 256
_LABEL = b"secure-oneshot/v1 policy approval\x00"

Policy = ExportPolicy | IngestPolicy


@dataclass(frozen=True)
class Approval:
    """One checked signature."""

    key_id: str
    name: str
    signed_at: str
    valid: bool
    reason: str


def signature_path(policy_path: str | os.PathLike[str]) -> Path:
    return Path(f"{os.fspath(policy_path)}.sig")


def _message(policy: Policy) -> bytes:
    return _LABEL + canonical_json({"policy_id": policy.id, "policy_version": policy.version, "policy_sha256": policy.sha256})


def _read_signatures(path: Path) -> list[dict[str, str]]:
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SIGNATURE_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the signature file ({e.strerror})") from e
    if len(data) > MAX_SIGNATURE_FILE_BYTES:
        raise ConfigError(f"{path}: signature file larger than {MAX_SIGNATURE_FILE_BYTES} bytes")
    try:
        doc = parse_strict_json(data, canonical=False)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not a valid signature file ({e})") from e
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURES_FORMAT or not isinstance(doc.get("signatures"), list):
        raise ConfigError(f"{path}: not a {SIGNATURES_FORMAT} file")
    if len(doc["signatures"]) > MAX_SIGNATURES:
        raise ConfigError(f"{path}: more than {MAX_SIGNATURES} signatures")
    return [s for s in doc["signatures"] if isinstance(s, dict)]


def read_signature_entries(policy_path: str | os.PathLike[str]) -> list[dict[str, str]]:
    """The signature entries of ``POLICY.toml.sig`` (bounded: size and count); none if the file is absent."""
    return _read_signatures(signature_path(policy_path))


def approval_entries(policy: Policy, entries: Sequence[object]) -> list[dict[str, str]]:
    """The entries worth carrying with the policy: by one of its approvers, over its exact bytes, known fields only."""
    kept = []
    for entry in entries:
        if not isinstance(entry, dict) or entry.get("key_id") not in policy.approvers or entry.get("policy_sha256") != policy.sha256:  # type: ignore[union-attr]
            continue
        if all(isinstance(entry.get(k), str) and len(entry[k]) <= _MAX_FIELD for k in _ENTRY_KEYS):
            kept.append({k: entry[k] for k in _ENTRY_KEYS})
    return kept[:MAX_SIGNATURES]


def sign_policy(policy: Policy, policy_path: str | os.PathLike[str], approver: Identity, now: datetime | None = None) -> Path:
    """Add ``approver``'s signature to the policy's ``.sig`` file (replacing an older one by the same key)."""
    path = signature_path(policy_path)
    others = [s for s in _read_signatures(path) if s.get("key_id") != approver.key_id]
    mine = {"key_id": approver.key_id, "name": approver.name, "signed_at": format_time(now or utc_now()),
            "policy_sha256": policy.sha256, "signature": b64encode(approver.sign(_message(policy)))}
    doc = {"format": SIGNATURES_FORMAT, "policy_id": policy.id, "policy_version": policy.version, "signatures": others + [mine]}
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("ascii"))
    return path


def _check_one(policy: Policy, entry: object, trust: TrustStore, now: datetime) -> Approval:
    if not isinstance(entry, dict):
        return Approval("", "", "", False, "not a signature entry")
    key_id, name, when = str(entry.get("key_id", "")), str(entry.get("name", "")), str(entry.get("signed_at", ""))
    if key_id not in policy.approvers:  # type: ignore[union-attr]
        return Approval(key_id, name, when, False, "not one of this policy's approvers")
    if entry.get("policy_sha256") != policy.sha256:
        return Approval(key_id, name, when, False, "signed a different version of the file (edited after signing)")
    try:
        public = trust.require(key_id, "approver", now)
        signature = b64decode(str(entry.get("signature", "")), length=64)
    except (SecureOneshotError, ValueError) as e:
        return Approval(key_id, name, when, False, getattr(e, "message", str(e)))
    ok = public.verify(_message(policy), signature)
    return Approval(key_id, public.name, when, ok, "valid" if ok else "signature does not verify")


def count_entry_approvals(policy: ExportPolicy, entries: Sequence[object], trust: TrustStore, now: datetime | None = None) -> tuple[int, list[Approval]]:
    """(distinct valid approver signatures among ``entries``, every entry checked): for a policy carried in a bundle.

    At most :data:`MAX_SIGNATURES` entries are checked; the rest count for nothing.
    """
    checked = [_check_one(policy, e, trust, now or utc_now()) for e in list(entries)[:MAX_SIGNATURES]]
    return len({a.key_id for a in checked if a.valid}), checked


def count_approvals(policy: ExportPolicy, policy_path: str | os.PathLike[str], trust: TrustStore, now: datetime | None = None) -> tuple[int, list[Approval]]:
    """(number of distinct valid approver signatures, every signature checked)."""
    return count_entry_approvals(policy, read_signature_entries(policy_path), trust, now)
