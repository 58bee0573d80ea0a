"""The trust store: which identities a site or server accepts, in which role, until when.

One TOML file (``keys/trust.toml`` by convention, documented in ``keys/README.md``)::

    version = 1

    [[identity]]
    name = "server"
    key_id = "..."            # must match the two public keys below
    sign_ed25519 = "..."
    encrypt_x25519 = "..."
    roles = ["recipient"]     # "sender", "recipient" and/or "approver" (signs policies)
    expires = 2027-12-31T00:00:00Z   # optional
    note = "coordinating server, confirmed by phone 2026-11-26"

    [[revoked]]
    key_id = "..."
    reason = "laptop stolen"
    revoked_at = 2026-11-20T09:00:00Z

Unknown keys are errors (a typo must not widen trust).  A revoked key id is
refused in every role even if it is also listed under ``[[identity]]``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from .._internal.atomic import atomic_write_bytes
from .._internal.compat import tomllib
from .._internal.encoding import format_time, utc_now
from ..errors import ConfigError, KeyMaterialError, TrustError
from .identity import PublicIdentity, check_key_id

__all__ = ["ROLES", "TrustEntry", "Revocation", "TrustStore", "load_trust_store", "save_trust_store"]

ROLES = ("sender", "recipient", "approver")
_IDENTITY_KEYS = {"name", "key_id", "sign_ed25519", "encrypt_x25519", "roles", "expires", "note"}
_REVOKED_KEYS = {"key_id", "reason", "revoked_at"}


@dataclass(frozen=True)
class TrustEntry:
    """One trusted identity and what it is trusted for."""

    identity: PublicIdentity
    roles: frozenset[str]
    expires: datetime | None = None
    note: str = ""

    def __post_init__(self) -> None:
        unknown = set(self.roles) - set(ROLES)
        if unknown or not self.roles:
            raise ValueError(f"roles must be a non-empty subset of {ROLES}, got {sorted(self.roles)}")


@dataclass(frozen=True)
class Revocation:
    """A key id that must never be accepted again."""

    key_id: str
    reason: str
    revoked_at: datetime


@dataclass(frozen=True)
class TrustStore:
    """An immutable trust store; ``with_*`` methods return updated copies."""

    entries: tuple[TrustEntry, ...] = ()
    revocations: tuple[Revocation, ...] = field(default=())

    def find(self, key_id: str) -> TrustEntry | None:
        return next((e for e in self.entries if e.identity.key_id == key_id), None)

    def revocation(self, key_id: str) -> Revocation | None:
        return next((r for r in self.revocations if r.key_id == key_id), None)

    def require(self, key_id: str, role: str, now: datetime | None = None) -> PublicIdentity:
        """Return the identity trusted for ``role`` under ``key_id``.

        Raises:
            TrustError: unknown, revoked, expired, or not trusted in this role.
        """
        now = now or utc_now()
        revoked = self.revocation(key_id)
        if revoked is not None:
            raise TrustError(
                f"{role} {key_id} was revoked on {format_time(revoked.revoked_at)} ({revoked.reason})",
                hint="a revoked identity is never accepted; the owner must create a new identity",
            )
        entry = self.find(key_id)
        if entry is None:
            raise TrustError(f"{role} {key_id} is not in the trust store")
        if role not in entry.roles:
            raise TrustError(f"{entry.identity.name} ({key_id}) is trusted as {sorted(entry.roles)}, not as {role}")
        if entry.expires is not None and now >= entry.expires:
            raise TrustError(
                f"trust in {entry.identity.name} ({key_id}) expired on {format_time(entry.expires)}",
                hint="confirm the identity with its owner again, then renew it with `keys trust add --expires`",
            )
        return entry.identity

    def with_entry(self, entry: TrustEntry) -> TrustStore:
        """Add or replace the entry for ``entry.identity.key_id``."""
        others = tuple(e for e in self.entries if e.identity.key_id != entry.identity.key_id)
        return replace(self, entries=others + (entry,))

    def with_revocation(self, key_id: str, reason: str, when: datetime | None = None) -> TrustStore:
        check_key_id(key_id)
        if self.revocation(key_id) is not None:
            return self
        return replace(self, revocations=self.revocations + (Revocation(key_id, reason, when or utc_now()),))


def _time(value: object, where: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ConfigError(f"{where}: expected a TOML date-time with a time zone, e.g. 2027-12-31T00:00:00Z")
    return value.astimezone(timezone.utc)


def _check_keys(table: Mapping[str, object], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}", hint=f"allowed keys: {', '.join(sorted(allowed))}")


def _entry_from_table(table: Mapping[str, object], where: str) -> TrustEntry:
    _check_keys(table, _IDENTITY_KEYS, where)
    try:
        identity = PublicIdentity.from_fields(dict(table), where)
    except KeyMaterialError as e:
        raise ConfigError(e.message, hint="copy the fields from the identity's .pub file, or use `keys trust add`") from e
    roles = table.get("roles")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise ConfigError(f"{where}.roles: expected a list such as [\"sender\"]")
    expires = _time(table["expires"], f"{where}.expires") if "expires" in table else None
    try:
        return TrustEntry(identity, frozenset(roles), expires, str(table.get("note", "")))
    except ValueError as e:
        raise ConfigError(f"{where}.roles: {e}") from e


def _revocation_from_table(table: Mapping[str, object], where: str) -> Revocation:
    _check_keys(table, _REVOKED_KEYS, where)
    try:
        key_id = check_key_id(table.get("key_id"))
    except ValueError as e:
        raise ConfigError(f"{where}.key_id: {e}") from e
    if "revoked_at" not in table:
        raise ConfigError(f"{where}: missing revoked_at")
    return Revocation(key_id, str(table.get("reason", "")), _time(table["revoked_at"], f"{where}.revoked_at"))


def trust_store_from_text(text: str, source: str = "<trust store>") -> TrustStore:
    """Parse and validate a trust store.

    Raises:
        ConfigError: syntax errors, unknown keys, wrong types, or duplicate key ids.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})") from e
    _check_keys(doc, {"version", "identity", "revoked"}, source)
    if doc.get("version") != 1:
        raise ConfigError(f"{source}: version must be 1, got {doc.get('version')!r}")
    entries = tuple(_entry_from_table(t, f"{source}: identity[{i}]") for i, t in enumerate(doc.get("identity", [])))
    revocations = tuple(_revocation_from_table(t, f"{source}: revoked[{i}]") for i, t in enumerate(doc.get("revoked", [])))
    ids = [e.identity.key_id for e in entries]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{source}: the same key id is listed twice under [[identity]]")
    return TrustStore(entries, revocations)


def _toml_string(value: str) -> str:
    # JSON string escapes are valid TOML basic-string escapes for ASCII output.
    return json.dumps(value, ensure_ascii=True)


def trust_store_to_text(store: TrustStore) -> str:
    """Render the store as commented TOML (comments written by people are not preserved)."""
    out = ["# secure-oneshot trust store (see keys/README.md). Managed by `secure-oneshot keys trust`.", "version = 1", ""]
    for entry in sorted(store.entries, key=lambda e: e.identity.name):
        out.append("[[identity]]")
        out += [f"{k} = {_toml_string(v)}" for k, v in entry.identity.public_fields().items()]
        out.append("roles = [" + ", ".join(_toml_string(r) for r in sorted(entry.roles)) + "]")
        if entry.expires is not None:
            out.append(f"expires = {format_time(entry.expires)}")
        if entry.note:
            out.append(f"note = {_toml_string(entry.note)}")
        out.append("")
    for revoked in store.revocations:
        out += [
            "[[revoked]]",
            f"key_id = {_toml_string(revoked.key_id)}",
            f"reason = {_toml_string(revoked.reason)}",
            f"revoked_at = {format_time(revoked.revoked_at)}",
            "",
        ]
    return "\n".join(out)


def load_trust_store(path: str | os.PathLike[str]) -> TrustStore:
    """Read a trust store file.  Raises ``ConfigError`` if it is missing or invalid."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"trust store {path} not found", hint="create one with `secure-oneshot keys trust add`") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read trust store {path}: {e}") from e
    return trust_store_from_text(text, str(path))


def save_trust_store(store: TrustStore, path: str | os.PathLike[str]) -> None:
    """Write the store atomically."""
    atomic_write_bytes(path, trust_store_to_text(store).encode("ascii"))
