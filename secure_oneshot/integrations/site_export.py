"""The site side of a platform adapter, without any platform: the site's own settings, and one export per request.

Everything that decides what leaves (model directory, key, trust store, export policy, recipients, audit log)
comes from a TOML file the hospital owns; each adapter only says where that file is (Flower: the SuperNode's node
config; NVFlare: the client's environment).  The server's request may carry a request id, which the site binds
into the bundle (``meta.request_id``, FORMAT.md 4.4); every other field it sends is ignored, and the attempt is
recorded in the site's audit log.  The export is :func:`~secure_oneshot.client.export.export_model`, the same call
as ``secure-oneshot export``, with the same audit record.
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

from .. import audit
from .._internal.strict_toml import Problems, Table
from ..bundle import inspect_bundle
from ..bundle.format import Header
from ..bundle.recipients import check_recipients
from ..client.export import ExportRequest, export_model
from ..errors import ConfigError
from ..keys import Identity, PublicIdentity, load_identity, load_public, load_trust_store
from ..keys.keyfile import UnsafePlaintextKeyWarning
from ..policy.evaluate import REQUEST_ID_RE

__all__ = ["SiteSettings", "read_settings", "load_site_settings", "site_identity", "ExportedBundle", "public_header",
           "export_for_request", "REQUEST_ID_KEY"]

REQUEST_ID_KEY = "request-id"   # the only field of the server's request the site uses


@dataclass(frozen=True)
class SiteSettings:
    """One hospital's settings for answering a platform's request (see ``examples/flower/flower-site.toml``)."""

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


def load_site_settings(path: Path, hint: str = "check where the platform names the site's settings file") -> SiteSettings:
    """Read a site settings file strictly (unknown keys are errors); relative paths are relative to the file."""
    t, problems = read_settings(path, "site settings", hint)
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


def site_identity(settings: SiteSettings) -> Identity:
    """The site's signing identity (its passphrase, if any, from the variable its settings name)."""
    passphrase = None
    if settings.passphrase_env:
        value = os.environ.get(settings.passphrase_env)
        if value is None:
            raise ConfigError(f"the passphrase variable {settings.passphrase_env} is not set on this node",
                              hint="set it in the site's client process environment")
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


def public_header(header: Header) -> dict[str, Any]:
    """The public header fields a platform may carry beside the bytes (informational: ingest reads the bytes)."""
    return {"bundle_id": header.bundle_id, "sender": header.sender, "recipients": list(header.recipient_ids),
            "created": header.created, "expires": header.expires, "policy_id": header.policy_id,
            "payload_size": header.payload_size}


def _record_ignored(settings: SiteSettings, sender: Identity, ignored: list[str], platform: str) -> None:
    """Invariant 7's spirit: the site's log shows that a server tried to steer an export, and that it was ignored."""
    audit.append_event(settings.audit_log, sender, audit.AuditEvent(
        action=f"{platform}-request", outcome="refused",
        reason=f"ignored {len(ignored)} field(s) of the server's request: the site's own settings decide what leaves",
        details={"ignored_fields": ignored[:64]}))


def export_for_request(settings_path: Path, request: Mapping[str, Any], extra_records: list[str], *, platform: str,
                       hint: str = "check where the platform names the site's settings file") -> ExportedBundle:
    """Answer one server request: the same ``export_model`` as ``secure-oneshot export``, under the site's settings.

    Args:
        settings_path: the site's own settings file (never named by the server).
        request: the fields of the server's request; only ``request-id`` is used.
        extra_records: names of any other parts the server's message carried (ignored and logged).
        platform: short platform name, used in the audit action (``<platform>-request``) and the outbox file name.

    Raises:
        SecureOneshotError: the export failed or was refused (the refusal is in the audit log, as for the CLI).
    """
    settings = load_site_settings(settings_path, hint)
    sender = site_identity(settings)
    ignored = sorted(str(k)[:64] for k in request if k != REQUEST_ID_KEY) + [f"record:{str(n)[:64]}" for n in sorted(extra_records)]
    if ignored:
        _record_ignored(settings, sender, ignored, platform)
    request_id = request.get(REQUEST_ID_KEY, "")
    if not isinstance(request_id, str) or (request_id and not REQUEST_ID_RE.fullmatch(request_id)):
        raise ConfigError("the server's request id is not 1..64 characters of [A-Za-z0-9._:-]", hint="nothing was exported")
    recipients: list[PublicIdentity] = check_recipients([load_public(p) for p in settings.recipients])
    settings.outbox.mkdir(parents=True, exist_ok=True)
    out = settings.outbox / f"{platform}-{request_id or secrets.token_hex(8)}.sob"
    report = export_model(ExportRequest(
        model_dir=settings.model_dir, policy_path=settings.policy, sender=sender, recipients=recipients, out=out,
        audit_log=settings.audit_log, trust=load_trust_store(settings.trust), without=settings.without,
        min_approvals=settings.min_approvals, request_id=request_id))
    assert report.bundle is not None  # not a dry run
    return ExportedBundle(report.bundle.path.read_bytes(), public_header(inspect_bundle(report.bundle.path)), report.bundle.path)
