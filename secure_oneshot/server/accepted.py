"""Re-open what ``ingest`` accepted, and nothing else: the loading half of the accepted registry.

``accepted/`` holds, per accepted bundle, ``<bundle_id>.sob`` (the exact bytes
ingest verified, still encrypted) and ``<bundle_id>.json`` (the registry entry).
:func:`open_accepted` uses a bundle only when all of these hold, and refuses the
whole load otherwise (a model built from an unexplained file is worse than no
model):

1. every ``.sob`` in the folder is named by a registry entry (an unlisted file
   is refused, never used);
2. the entry parses (bounded size and nesting), names a well-formed bundle id
   and ``file_sha256``, and sits at ``<bundle_id>.json``;
3. the ``.sob``'s SHA-256 equals the entry's ``file_sha256``;
4. the replay ledger lists the bundle id as accepted;
5. the bundle verifies again (signature, trust, expiry: ``open_bundle``) and its
   header's bundle id is the entry's;
6. the ingest policy accepts it again.  The policy is the one given, or else the
   file the entry says accepted it, whose SHA-256 must still be the recorded one.

The server folder is held with a shared lock throughout, so no ingest changes
the registry mid-read.  ``accepted/`` is private to the server (0700); the
checks above catch files placed or changed there by anything but ingest.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .._internal.termsafe import printable
from ..bundle import OpenedBundle, ReplayLedger, VerifyOptions, open_bundle
from ..errors import BundleAuthError, ConfigError, SecureOneshotError
from ..keys import Identity, TrustStore
from ..policy.load import load_ingest_policy
from ..policy.model import IngestPolicy
from .ingest import IngestFolders, check_ingest_policy
from .registry import BUNDLE_ID, SHA256_HEX, bundle_file_limit, file_sha256, read_registry_entry, server_lock

__all__ = ["AcceptedBundle", "open_accepted"]

_HINT = "the accepted folder was changed outside ingest: remove the file (and its entry), then ingest the original bundle again"


@dataclass
class AcceptedBundle:
    """A bundle re-opened from ``accepted/`` after every check, with its registry entry."""

    opened: OpenedBundle
    entry: dict[str, Any]
    policy: IngestPolicy


def _listing(accepted: Path) -> tuple[list[str], set[str]]:
    """(registry entry names, stored bundle names) of the folder; atomic-write temporaries are ignored."""
    try:
        names = sorted(os.listdir(accepted))
    except OSError as e:
        raise ConfigError(f"cannot read {accepted}: {e.strerror or e}", hint="run `secure-oneshot ingest` first") from e
    visible = [n for n in names if not n.startswith(".")]
    return [n for n in visible if n.endswith(".json")], {n for n in visible if n.endswith(".sob")}


def _check_entry(entry: dict[str, Any], name: str) -> tuple[str, str]:
    bundle_id, digest = entry.get("bundle_id"), entry.get("file_sha256")
    if not (isinstance(bundle_id, str) and BUNDLE_ID.fullmatch(bundle_id)) or name != f"{bundle_id}.json":
        raise ConfigError(f"registry entry {printable(name, 120)} does not name its own bundle id", hint=_HINT)
    if not (isinstance(digest, str) and SHA256_HEX.fullmatch(digest)):
        raise ConfigError(f"registry entry {name} has no valid file_sha256 (written by an older version?)", hint=_HINT)
    return bundle_id, digest


class _Policies:
    """The ingest policy to re-check with: the one given, or each entry's recorded policy file (unchanged)."""

    def __init__(self, given: IngestPolicy | None) -> None:
        self.given = given
        self._loaded: dict[str, IngestPolicy] = {}

    def for_entry(self, entry: dict[str, Any], bundle_id: str) -> IngestPolicy:
        if self.given is not None:
            return self.given
        record = entry.get("ingest_policy")
        path = record.get("path") if isinstance(record, dict) else None
        if not (isinstance(path, str) and path):
            raise ConfigError(f"bundle {bundle_id}: the registry does not record which ingest policy accepted it",
                              hint="pass the ingest policy to re-check against (--policy POLICY.toml)")
        if path not in self._loaded:
            self._loaded[path] = load_ingest_policy(path)
        policy = self._loaded[path]
        if policy.sha256 != record.get("sha256"):
            raise ConfigError(f"bundle {bundle_id}: the ingest policy {path} changed since it accepted the bundle",
                              hint="pass the ingest policy to re-check against (--policy POLICY.toml)")
        return policy


def _open_one(folders: IngestFolders, name: str, identity: Identity, trust: TrustStore, ledger: ReplayLedger, policies: _Policies,
              now: datetime | None) -> AcceptedBundle:
    entry = read_registry_entry(folders.accepted / name)
    bundle_id, digest = _check_entry(entry, name)
    policy = policies.for_entry(entry, bundle_id)
    stored = folders.accepted / f"{bundle_id}.sob"
    if file_sha256(stored, bundle_file_limit(policy.max_bundle_bytes)) != digest:
        raise BundleAuthError(f"{stored} differs from the file ingest verified (SHA-256 mismatch)", hint=_HINT)
    if not ledger.contains(bundle_id):
        raise BundleAuthError(f"bundle {bundle_id} is in accepted/ but not in the replay ledger {folders.ledger}", hint=_HINT)
    # The decrypted payload goes to an anonymous file in the server's private staging folder (made by ingest, 0700)
    # rather than a shared temporary folder.
    scratch = folders.staging if folders.staging.is_dir() else None
    opened = open_bundle(stored, identity, trust, now=now,
                         options=VerifyOptions(max_payload_bytes=policy.max_bundle_bytes, scratch_dir=scratch))
    if opened.header.bundle_id != bundle_id:
        raise BundleAuthError(f"{stored} holds bundle {opened.header.bundle_id}, not {bundle_id}", hint=_HINT)
    check_ingest_policy(policy, opened, trust, now)
    return AcceptedBundle(opened, entry, policy)


def _require_folder(path: Path) -> None:
    try:
        if not stat.S_ISDIR(os.lstat(path).st_mode):
            raise ConfigError(f"{path} is not a folder", hint=_HINT)
    except FileNotFoundError as e:
        raise ConfigError(f"no accepted bundles: {path} does not exist", hint="run `secure-oneshot ingest` first") from e


def open_accepted(folders: IngestFolders, identity: Identity, trust: TrustStore, policy: IngestPolicy | None = None, *,
                  now: datetime | None = None) -> Iterator[AcceptedBundle]:
    """Yield each accepted bundle, re-opened and re-checked (see the module docstring), in registry order.

    The folder-wide checks (no unlisted ``.sob``) run before the first bundle is yielded; the shared lock is
    held until the iteration ends.

    Raises:
        ConfigError: no registry, an unlisted or malformed file, or no usable ingest policy.
        BundleAuthError: a stored file differs from what was verified, or is missing from the ledger.
        ResourceError: an ingest holds the server folder.
        and whatever ``open_bundle`` or the policy raise for a bundle that no longer passes.
    """
    _require_folder(folders.accepted)
    with server_lock(folders.root, shared=True):
        entries, stored = _listing(folders.accepted)
        unlisted = sorted(stored - {n.removesuffix(".json") + ".sob" for n in entries})
        if unlisted:
            raise ConfigError(f"{printable(str(folders.accepted / unlisted[0]), 300)} is not listed in the accepted registry; refusing to use it"
                              + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else ""), hint=_HINT)
        ledger = ReplayLedger.read_only(folders.ledger)
        try:
            policies = _Policies(policy)
            for name in entries:
                try:
                    yield _open_one(folders, name, identity, trust, ledger, policies, now)
                except SecureOneshotError as error:
                    error.message = f"accepted bundle {printable(name.removesuffix('.json'), 120)}: {error.message}"
                    raise
        finally:
            ledger.close()
