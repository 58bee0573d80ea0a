"""Load and validate policy files: fail closed, every problem reported at once with ``file:line``.

Unknown keys, wrong types and out-of-range values are errors, never warnings
(a typo must not widen what leaves a site).  All problems in a file are
collected and raised as one :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from collections.abc import Callable
from typing import Any

from .._internal.compat import tomllib
from ..bundle.safetensors_strict import DTYPE_SIZES
from ..errors import ConfigError
from .._internal.strict_toml import Problems, Table, all_of, one_of, positive, probability
from .model import (
    ARTIFACT_MODES,
    ARTIFACTS,
    EXPORT_SCHEMA,
    OPTIONAL_ARTIFACTS,
    INGEST_SCHEMA,
    MAX_VALID_DAYS,
    MIN_VALID_DAYS,
    DpLimit,
    ExportPolicy,
    StatementRules,
    IngestPolicy,
    TensorRule,
)

__all__ = ["MAX_POLICY_BYTES", "load_policy", "policy_from_text", "policy_from_bytes", "read_policy_bytes", "load_export_policy",
           "load_ingest_policy"]

MAX_POLICY_BYTES = 64 * 1024
"""A reviewed policy is a few kilobytes; a bigger file is refused (it also travels in bundles: FORMAT.md)."""

_ID = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")


def _key_ids(values: list[str]) -> str | None:
    bad = [v for v in values if not _KEY_ID.match(v)]
    return f"{bad} are not key ids (32 lowercase hex digits, as `keys fingerprint` prints without spaces)" if bad else None


def _policy_id(v: str) -> str | None:
    return None if _ID.match(v) else "must be 1-128 characters of A-Z a-z 0-9 . _ : / @ + -"


def _read_header(t: Table, schema: str) -> tuple[str, int, str]:
    t.get("schema", "string", check=one_of((schema,)))
    return (
        t.get("id", "string", check=_policy_id),
        t.get("version", "integer", check=positive),
        t.get("owner", "string"),
    )


def _read_dp_limit(t: Table) -> DpLimit:
    limit = DpLimit(
        max_epsilon=t.get("max_epsilon", "number", check=positive),
        max_delta=t.get("max_delta", "number", check=probability),
        accountants=tuple(t.get("accountants", "list of strings", ["prv", "rdp"], check=all_of(("prv", "rdp"))) or ()),
        require_poisson=t.get("require_poisson", "boolean", True),
    )
    t.finish()
    return limit


def _read_dp_tables(t: Table, allowed: tuple[str, ...]) -> dict[str, DpLimit]:
    limits = {}
    for name in sorted(t.data):
        if name not in allowed:
            t.read.add(name)
            t.problems.add(f"{t.path}.{name}", f"unknown artifact; expected one of {', '.join(allowed)}")
            continue
        limits[name] = _read_dp_limit(t.table(name))
    t.finish()
    return limits


def _read_tensor_rules(root: Table) -> tuple[TensorRule, ...]:
    rules = []
    for i, raw in enumerate(root.get("tensors", "list of tables", [])):
        t = Table(raw, f"tensors[{i}]", root.problems)
        rule = TensorRule(
            artifact=t.get("artifact", "string", check=one_of(ARTIFACTS)),
            names=tuple(t.get("names", "list of strings", check=lambda v: None if v else "must list at least one pattern") or ()),
            dtypes=tuple(t.get("dtypes", "list of strings", check=all_of(sorted(DTYPE_SIZES))) or ()),
            max_bytes=t.get("max_bytes", "integer", check=positive),
            index=i,
        )
        t.finish()
        rules.append(rule)
    return tuple(rules)


def _valid_days(v: float) -> str | None:
    ok = math.isfinite(v) and MIN_VALID_DAYS <= v <= MAX_VALID_DAYS
    return None if ok else f"must be between {MIN_VALID_DAYS:.4g} (one hour) and {MAX_VALID_DAYS} days"


def _export_policy(root: Table) -> ExportPolicy:
    policy_id, version, owner = _read_header(root, EXPORT_SCHEMA)
    effective, expires = root.get("effective", "date-time"), root.get("expires", "date-time")
    if effective and expires and expires <= effective:
        root.problems.add("expires", "must be after effective")
    study = root.table("study")
    study_fields = {k: study.get(k, "string") for k in ("title", "irb", "dua")}
    study.finish()
    approval = root.table("approval")
    approvers = tuple(approval.get("approvers", "list of strings", check=_key_ids) or ())
    required = approval.get("required", "integer", check=lambda v: None if 0 <= v <= len(approvers) else f"must be between 0 and the number of approvers ({len(approvers)})")
    approval.finish()
    recipients = root.table("recipients")
    allowed = tuple(recipients.get("allowed", "list of strings", check=_key_ids) or ())
    recipients.finish()
    artifacts_t = root.table("artifacts")
    artifacts = {a: artifacts_t.get(a, "string", *(("deny",) if a in OPTIONAL_ARTIFACTS else ()), check=one_of(ARTIFACT_MODES))
                 for a in ARTIFACTS}
    artifacts_t.finish()
    dp = _read_dp_tables(root.table("dp", required=False), ARTIFACTS + ("composed",))
    for name, mode in artifacts.items():
        if mode == "allow-with-dp" and name not in dp:
            root.problems.add(f"artifacts.{name}", f"is allow-with-dp but there is no [dp.{name}] table with its limits")
    bundle = root.table("bundle")
    max_bytes = bundle.get("max_bytes", "integer", check=positive)
    valid_days = bundle.get("valid_days", "number", check=_valid_days)
    bundle.finish()
    tensors = _read_tensor_rules(root)
    statement = _read_statement_rules(root.table("privacy_statement", required=False))
    root.finish()
    return ExportPolicy(
        policy_id, version, owner, effective, expires, study_fields, required, approvers, allowed, artifacts,
        tensors, {k: v for k, v in dp.items() if k != "composed"}, dp.get("composed"), max_bytes, valid_days, statement,
    )


def _read_statement_rules(t: Table) -> StatementRules:
    """``[privacy_statement]`` (optional): requirements on the statement every export carries."""
    k = t.get("max_images_per_patient", "integer", 0, check=lambda v: None if 0 <= v <= 100_000 else "must be between 0 (not declared) and 100000")
    rules = StatementRules(
        require_privacy_audit=t.get("require_privacy_audit", "boolean", False),
        max_composed_epsilon=t.get("max_composed_epsilon", "number", None, check=positive),
        max_images_per_patient=k or None,
        share_record_count=t.get("share_record_count", "boolean", False),
        share_utility=t.get("share_utility", "boolean", False),
    )
    t.finish()
    return rules


def _ingest_policy(root: Table) -> IngestPolicy:
    policy_id, version, owner = _read_header(root, INGEST_SCHEMA)
    require_site_policy = root.get("require_site_policy", "boolean", False)
    min_approvals = root.get("min_site_policy_approvals", "integer", 1,
                             check=lambda v: None if 0 <= v <= 16 else "must be between 0 and 16")
    senders = root.table("senders")
    allowed = tuple(senders.get("allowed", "list of strings", check=_key_ids) or ())
    senders.finish()
    artifacts = root.table("artifacts")
    required = tuple(artifacts.get("required", "list of strings", ["classifier"], check=all_of(ARTIFACTS)) or ())
    denied = tuple(artifacts.get("denied", "list of strings", [], check=all_of(ARTIFACTS)) or ())
    require_dp = tuple(artifacts.get("require_dp", "list of strings", [], check=all_of(ARTIFACTS)) or ())
    artifacts.finish()
    dp = _read_dp_tables(root.table("dp", required=False), ARTIFACTS)
    for name in require_dp:
        if name not in dp:
            root.problems.add("artifacts.require_dp", f"requires DP for {name} but there is no [dp.{name}] table")
    models = root.table("models")
    architectures = tuple(models.get("architectures", "list of strings") or ())
    models.finish()
    limits = root.table("limits")
    sizes = [limits.get(k, "integer", check=positive) for k in ("max_bundle_bytes", "max_tensors", "max_tensor_bytes")]
    limits.finish()
    root.finish()
    return IngestPolicy(policy_id, version, owner, allowed, required, denied, dp, require_dp, architectures, *sizes,
                        require_site_policy=require_site_policy, min_site_policy_approvals=min_approvals)


_KINDS: dict[str, Callable[[Table], Any]] = {EXPORT_SCHEMA: _export_policy, INGEST_SCHEMA: _ingest_policy}


def policy_from_text(text: str, source: str = "<policy>") -> ExportPolicy | IngestPolicy:
    """Parse and validate a policy of either kind (chosen by its ``schema`` key).

    Raises:
        ConfigError: syntax errors, unknown keys, wrong types, out-of-range values (all listed).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})", hint="check quotes, brackets and '=' near that line") from e
    problems = Problems(source, text, "fix each listed key; policies/README.md documents every field")
    schema = data.get("schema")
    if schema not in _KINDS:
        problems.add("schema", f"must be {EXPORT_SCHEMA!r} or {INGEST_SCHEMA!r}, got {schema!r}")
        problems.raise_if_any()
    policy = _KINDS[schema](Table(data, "", problems))
    problems.raise_if_any()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return type(policy)(**{**policy.__dict__, "sha256": digest, "source": source})


def read_policy_bytes(path: str | os.PathLike[str]) -> bytes:
    """The exact bytes of a policy file, at most :data:`MAX_POLICY_BYTES`."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_POLICY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read policy {path}: {e.strerror}", hint="check the path") from e
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"{path}: policy file larger than {MAX_POLICY_BYTES} bytes", hint="a reviewed policy is a few kilobytes")
    return raw


def policy_from_bytes(raw: bytes, source: str = "<policy>") -> ExportPolicy | IngestPolicy:
    """Parse a policy from its exact bytes (a file, or the copy a bundle carries); ``sha256`` is over these bytes."""
    if len(raw) > MAX_POLICY_BYTES:
        raise ConfigError(f"{source}: policy larger than {MAX_POLICY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{source}: not UTF-8 text") from e
    return policy_from_text(text, source)  # UTF-8 round-trips, so sha256 is over the exact bytes


def load_policy(path: str | os.PathLike[str]) -> ExportPolicy | IngestPolicy:
    """Read a policy file.  Its ``sha256`` is over the exact bytes (what approvers sign)."""
    return policy_from_bytes(read_policy_bytes(path), str(path))


def load_export_policy(path: str | os.PathLike[str]) -> ExportPolicy:
    policy = load_policy(path)
    if not isinstance(policy, ExportPolicy):
        raise ConfigError(f"{path} is a server ingest policy, not a site export policy")
    return policy


def load_ingest_policy(path: str | os.PathLike[str]) -> IngestPolicy:
    policy = load_policy(path)
    if not isinstance(policy, IngestPolicy):
        raise ConfigError(f"{path} is a site export policy, not a server ingest policy")
    return policy
