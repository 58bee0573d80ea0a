"""The site side of the Flower app, without Flower: the site's own settings, and one export per request.

Everything that decides what leaves (model directory, key, trust store, export policy, recipients, audit log)
comes from a TOML file the hospital owns (``site_config_path``), named by the SuperNode's node config
(``flower-supernode --node-config "site-config='/etc/secure-oneshot/flower-site.toml'"``).  The server's request
may carry a request id, which the site binds into the bundle (``meta.request_id``, FORMAT.md 4.4); every other
field it sends is ignored, and the attempt is recorded in the site's audit log.
"""

from __future__ import annotations

import os
import secrets
import tomllib
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ... import audit
from ..._internal.strict_toml import Problems, Table
from ...bundle import inspect_bundle
from ...bundle.recipients import check_recipients
from ...client.export import ExportRequest, export_model
from ...errors import ConfigError
from ...keys import Identity, PublicIdentity, load_identity, load_public, load_trust_store
from ...keys.keyfile import UnsafePlaintextKeyWarning
from ...policy.evaluate import REQUEST_ID_RE
from . import REQUEST_ID_KEY

__all__ = ["SiteSettings", "load_site_settings", "site_config_path", "SITE_CONFIG_KEY", "SIMULATION_SITES_ENV",
           "ExportedBundle", "export_for_request"]

SITE_CONFIG_KEY = "site-config"
"""Node-config key naming the site's settings file (``flower-supernode --node-config "site-config='...'"``)."""
SIMULATION_SITES_ENV = "SECURE_ONESHOT_FLOWER_SITES"
"""In Flower's simulation the node config holds only ``partition-id``: the site's settings are then
``$SECURE_ONESHOT_FLOWER_SITES/site-<partition-id>.toml``, read from the machine that runs the virtual sites."""


@dataclass(frozen=True)
class SiteSettings:
    """One hospital's settings for answering a Flower query (see ``examples/flower/flower-site.toml``)."""

    model_dir: Path
    policy: Path
    key: Path
    trust: Path
    recipients: tuple[Path, ...]
    audit_log: Path
    outbox: Path
    passphrase_env: str = ""
    without: frozenset[str] = frozenset()
    min_approvals: int = 0



def read_settings(path: Path, what: str, hint: str) -> tuple[Table, Problems]:
    """The top-level table of the TOML settings file ``path``, for strict reading (unknown keys become problems).

    Raises:
        ConfigError: the file cannot be read, or is not UTF-8 TOML (naming ``what`` and ``path``).
    """
    try:
        text = path.read_text(encoding="utf-8")
        data = tomllib.loads(text)
    except OSError as e:
        raise ConfigError(f"cannot read the {what} {path}: {e.strerror}", hint=hint) from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    problems = Problems(str(path), text)
    return Table(data, "", problems), problems

def load_site_settings(path: Path) -> SiteSettings:
    """Read a site settings file strictly (unknown keys are errors); relative paths are relative to the file."""
    t, problems = read_settings(path, "site settings", "check the node config's site-config")
    base = path.parent

    def where(value: str | None) -> Path:
        return base / (value or "")

    settings = SiteSettings(
        model_dir=where(t.get("model_dir", "string")), policy=where(t.get("policy", "string")), key=where(t.get("key", "string")),
        trust=where(t.get("trust", "string")), recipients=tuple(where(r) for r in t.get("recipients", "list of strings") or []),
        audit_log=where(t.get("audit_log", "string")), outbox=where(t.get("outbox", "string")),
        passphrase_env=t.get("passphrase_env", "string", ""), without=frozenset(t.get("without", "list of strings", [])),
        min_approvals=t.get("min_approvals", "integer", 0),
    )
    t.finish()
    if not settings.recipients and "recipients" in t.data:
        problems.add("recipients", "must name at least one recipient public key")
    problems.raise_if_any()
    return settings


def site_config_path(node_config: Mapping[str, Any]) -> Path:
    """The site's settings file, from the node config only (never from a message)."""
    named = node_config.get(SITE_CONFIG_KEY)
    if isinstance(named, str) and named:
        return Path(named)
    folder = os.environ.get(SIMULATION_SITES_ENV)
    partition = node_config.get("partition-id")
    if folder and isinstance(partition, int) and not isinstance(partition, bool):
        return Path(folder) / f"site-{partition}.toml"
    raise ConfigError(f"this node has no {SITE_CONFIG_KEY} in its node config",
                      hint=f"start it with flower-supernode --node-config \"{SITE_CONFIG_KEY}='/path/flower-site.toml'\"")


def _identity(settings: SiteSettings) -> Identity:
    passphrase = None
    if settings.passphrase_env:
        value = os.environ.get(settings.passphrase_env)
        if value is None:
            raise ConfigError(f"the passphrase variable {settings.passphrase_env} is not set on this node",
                              hint="set it in the SuperNode's environment")
        passphrase = value.encode("utf-8")
    with warnings.catch_warnings():
        # an unprotected key is the site's choice (its settings say no passphrase_env); keys.load_identity warns once
        warnings.simplefilter("ignore", UnsafePlaintextKeyWarning)
        return load_identity(settings.key, passphrase)


@dataclass(frozen=True)
class ExportedBundle:
    data: bytes                # the bundle file's bytes, exactly as written to the outbox
    header: dict[str, Any]     # its public header fields (what `secure-oneshot inspect` shows without keys)
    path: Path


def _public_header(path: Path) -> dict[str, Any]:
    h = inspect_bundle(path)
    return {"bundle_id": h.bundle_id, "sender": h.sender, "recipients": list(h.recipient_ids), "created": h.created,
            "expires": h.expires, "policy_id": h.policy_id, "payload_size": h.payload_size}


def _record_ignored(settings: SiteSettings, sender: Identity, ignored: list[str]) -> None:
    """Invariant 7's spirit: the site's log shows that a server tried to steer an export, and that it was ignored."""
    audit.append_event(settings.audit_log, sender, audit.AuditEvent(
        action="flower-request", outcome="refused",
        reason=f"ignored {len(ignored)} field(s) of the server's request: the site's own settings decide what leaves",
        details={"ignored_fields": ignored[:64]}))


def export_for_request(node_config: Mapping[str, Any], request: Mapping[str, Any], extra_records: list[str]) -> ExportedBundle:
    """Answer one server request: the same ``export_model`` as ``secure-oneshot export``, under the site's settings.

    Args:
        node_config: the SuperNode's node config (names the site's settings).
        request: the fields of the server's request record; only ``request-id`` is used.
        extra_records: names of any other records the server's message carried (ignored and logged).

    Raises:
        SecureOneshotError: the export failed or was refused (the refusal is in the audit log, as for the CLI).
    """
    settings = load_site_settings(site_config_path(node_config))
    sender = _identity(settings)
    ignored = sorted(str(k)[:64] for k in request if k != REQUEST_ID_KEY) + [f"record:{str(n)[:64]}" for n in sorted(extra_records)]
    if ignored:
        _record_ignored(settings, sender, ignored)
    request_id = request.get(REQUEST_ID_KEY, "")
    if not isinstance(request_id, str) or (request_id and not REQUEST_ID_RE.fullmatch(request_id)):
        raise ConfigError("the server's request id is not 1..64 characters of [A-Za-z0-9._:-]", hint="nothing was exported")
    recipients: list[PublicIdentity] = check_recipients([load_public(p) for p in settings.recipients])
    settings.outbox.mkdir(parents=True, exist_ok=True)
    out = settings.outbox / f"flower-{request_id or secrets.token_hex(8)}.sob"
    report = export_model(ExportRequest(
        model_dir=settings.model_dir, policy_path=settings.policy, sender=sender, recipients=recipients, out=out,
        audit_log=settings.audit_log, trust=load_trust_store(settings.trust), without=settings.without,
        min_approvals=settings.min_approvals, request_id=request_id))
    assert report.bundle is not None  # not a dry run
    return ExportedBundle(report.bundle.path.read_bytes(), _public_header(report.bundle.path), report.bundle.path)
