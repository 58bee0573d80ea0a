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
from datetime import datetime
from pathlib import Path
from typing import Any

from .._internal.compat import tomllib
from ..bundle.safetensors_strict import DTYPES
from ..errors import ConfigError
from .locate import line_index, line_of
from .model import (
    ARTIFACT_MODES,
    ARTIFACTS,
    EXPORT_SCHEMA,
    INGEST_SCHEMA,
    DpLimit,
    ExportPolicy,
    IngestPolicy,
    TensorRule,
)

__all__ = ["load_policy", "policy_from_text", "load_export_policy", "load_ingest_policy"]

_ID = re.compile(r"^[A-Za-z0-9._:/@+-]{1,128}$")
_KEY_ID = re.compile(r"^[0-9a-f]{32}$")
_MISSING = object()


class _Problems:
    """Collects problems with their key paths, then raises one ConfigError."""

    def __init__(self, source: str, text: str) -> None:
        self.source, self.lines, self.items = source, line_index(text), []  # type: ignore[var-annotated]

    def add(self, path: str, problem: str) -> None:
        self.items.append((line_of(self.lines, path), path, problem))

    def raise_if_any(self) -> None:
        if not self.items:
            return
        rendered = [f"{self.source}:{line}: {path}: {problem}" for line, path, problem in sorted(self.items)]
        message = rendered[0] if len(rendered) == 1 else f"{self.source}: {len(rendered)} problems\n  " + "\n  ".join(rendered)
        raise ConfigError(message, hint="fix each listed key; policies/README.md documents every field")


class _Table:
    """Typed, strict access to one TOML table; remembers which keys were read."""

    def __init__(self, data: Any, path: str, problems: _Problems) -> None:
        self.path, self.problems = path, problems
        if not isinstance(data, dict):
            problems.add(path, "must be a table")
            data = {}
        self.data, self.read = data, set()  # type: ignore[var-annotated]

    def _key(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def get(self, key: str, kind: str, default: Any = _MISSING, check: Callable[[Any], str | None] | None = None) -> Any:
        self.read.add(key)
        if key not in self.data:
            if default is _MISSING:
                self.problems.add(self._key(key), f"missing (expected {kind})")
            return None if default is _MISSING else default
        value = self.data[key]
        problem = _type_problem(value, kind) or (check(value) if check else None)
        if problem:
            self.problems.add(self._key(key), problem)
            return None if default is _MISSING else default
        return value

    def table(self, key: str, required: bool = True) -> _Table:
        self.read.add(key)
        if key not in self.data and not required:
            return _Table({}, self._key(key), self.problems)
        return _Table(self.data.get(key), self._key(key), self.problems)

    def finish(self) -> None:
        for key in sorted(set(self.data) - self.read):
            self.problems.add(self._key(key), "unknown key (typo?): unknown keys are refused so they cannot widen a policy")


def _type_problem(value: Any, kind: str) -> str | None:
    checks: dict[str, Callable[[Any], bool]] = {
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
        "boolean": lambda v: isinstance(v, bool),
        "date-time": lambda v: isinstance(v, datetime) and v.tzinfo is not None,
        "list of strings": lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
        "list of tables": lambda v: isinstance(v, list) and all(isinstance(x, dict) for x in v),
    }
    if checks[kind](value):
        return None
    extra = " with a time zone, e.g. 2027-01-01T00:00:00Z" if kind == "date-time" else ""
    return f"must be a {kind}{extra}, got {type(value).__name__} {value!r}"


def _positive(v: Any) -> str | None:
    return None if v > 0 else f"must be positive, got {v}"


def _probability(v: Any) -> str | None:
    return None if 0 < v < 1 else f"must be between 0 and 1 (exclusive), got {v}"


def _one_of(options: tuple[str, ...]) -> Callable[[Any], str | None]:
    return lambda v: None if v in options else f"must be one of {', '.join(options)}; got {v!r}"


def _all_of(options: tuple[str, ...] | list[str]) -> Callable[[Any], str | None]:
    def check(values: list[str]) -> str | None:
        bad = [v for v in values if v not in options]
        return f"unknown value(s) {bad}; allowed: {', '.join(options)}" if bad else None

    return check


def _key_ids(values: list[str]) -> str | None:
    bad = [v for v in values if not _KEY_ID.match(v)]
    return f"{bad} are not key ids (32 lowercase hex digits, as `keys fingerprint` prints without spaces)" if bad else None


def _policy_id(v: str) -> str | None:
    return None if _ID.match(v) else "must be 1-128 characters of A-Z a-z 0-9 . _ : / @ + -"


def _read_header(t: _Table, schema: str) -> tuple[str, int, str]:
    t.get("schema", "string", check=_one_of((schema,)))
    return (
        t.get("id", "string", check=_policy_id),
        t.get("version", "integer", check=_positive),
        t.get("owner", "string"),
    )


def _read_dp_limit(t: _Table) -> DpLimit:
    limit = DpLimit(
        max_epsilon=t.get("max_epsilon", "number", check=_positive),
        max_delta=t.get("max_delta", "number", check=_probability),
        accountants=tuple(t.get("accountants", "list of strings", ["prv", "rdp"], check=_all_of(("prv", "rdp"))) or ()),
        require_poisson=t.get("require_poisson", "boolean", True),
    )
    t.finish()
    return limit


def _read_dp_tables(t: _Table, allowed: tuple[str, ...]) -> dict[str, DpLimit]:
    limits = {}
    for name in sorted(t.data):
        if name not in allowed:
            t.read.add(name)
            t.problems.add(f"{t.path}.{name}", f"unknown artifact; expected one of {', '.join(allowed)}")
            continue
        limits[name] = _read_dp_limit(t.table(name))
    t.finish()
    return limits


def _read_tensor_rules(root: _Table) -> tuple[TensorRule, ...]:
    rules = []
    for i, raw in enumerate(root.get("tensors", "list of tables", [])):
        t = _Table(raw, f"tensors[{i}]", root.problems)
        rule = TensorRule(
            artifact=t.get("artifact", "string", check=_one_of(ARTIFACTS)),
            names=tuple(t.get("names", "list of strings", check=lambda v: None if v else "must list at least one pattern") or ()),
            dtypes=tuple(t.get("dtypes", "list of strings", check=_all_of(sorted(DTYPES))) or ()),
            max_bytes=t.get("max_bytes", "integer", check=_positive),
            index=i,
        )
        t.finish()
        rules.append(rule)
    return tuple(rules)


def _export_policy(root: _Table) -> ExportPolicy:
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
    artifacts = {a: artifacts_t.get(a, "string", check=_one_of(ARTIFACT_MODES)) for a in ARTIFACTS}
    artifacts_t.finish()
    dp = _read_dp_tables(root.table("dp", required=False), ARTIFACTS + ("composed",))
    for name, mode in artifacts.items():
        if mode == "allow-with-dp" and name not in dp:
            root.problems.add(f"artifacts.{name}", f"is allow-with-dp but there is no [dp.{name}] table with its limits")
    bundle = root.table("bundle")
    max_bytes = bundle.get("max_bytes", "integer", check=_positive)
    valid_days = bundle.get("valid_days", "number", check=lambda v: None if 0 < v <= 365 else "must be between 0 and 365 days")
    bundle.finish()
    tensors = _read_tensor_rules(root)
    root.finish()
    return ExportPolicy(
        policy_id, version, owner, effective, expires, study_fields, required, approvers, allowed, artifacts,
        tensors, {k: v for k, v in dp.items() if k != "composed"}, dp.get("composed"), max_bytes, valid_days,
    )


def _ingest_policy(root: _Table) -> IngestPolicy:
    policy_id, version, owner = _read_header(root, INGEST_SCHEMA)
    senders = root.table("senders")
    allowed = tuple(senders.get("allowed", "list of strings", check=_key_ids) or ())
    senders.finish()
    artifacts = root.table("artifacts")
    required = tuple(artifacts.get("required", "list of strings", ["classifier"], check=_all_of(ARTIFACTS)) or ())
    denied = tuple(artifacts.get("denied", "list of strings", [], check=_all_of(ARTIFACTS)) or ())
    require_dp = tuple(artifacts.get("require_dp", "list of strings", [], check=_all_of(ARTIFACTS)) or ())
    artifacts.finish()
    dp = _read_dp_tables(root.table("dp", required=False), ARTIFACTS)
    for name in require_dp:
        if name not in dp:
            root.problems.add("artifacts.require_dp", f"requires DP for {name} but there is no [dp.{name}] table")
    models = root.table("models")
    architectures = tuple(models.get("architectures", "list of strings") or ())
    models.finish()
    limits = root.table("limits")
    sizes = [limits.get(k, "integer", check=_positive) for k in ("max_bundle_bytes", "max_tensors", "max_tensor_bytes")]
    limits.finish()
    root.finish()
    return IngestPolicy(policy_id, version, owner, allowed, required, denied, dp, require_dp, architectures, *sizes)


_KINDS: dict[str, Callable[[_Table], Any]] = {EXPORT_SCHEMA: _export_policy, INGEST_SCHEMA: _ingest_policy}


def policy_from_text(text: str, source: str = "<policy>") -> ExportPolicy | IngestPolicy:
    """Parse and validate a policy of either kind (chosen by its ``schema`` key).

    Raises:
        ConfigError: syntax errors, unknown keys, wrong types, out-of-range values (all listed).
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: invalid TOML ({e})", hint="check quotes, brackets and '=' near that line") from e
    problems = _Problems(source, text)
    schema = data.get("schema")
    if schema not in _KINDS:
        problems.add("schema", f"must be {EXPORT_SCHEMA!r} or {INGEST_SCHEMA!r}, got {schema!r}")
        problems.raise_if_any()
    policy = _KINDS[schema](_Table(data, "", problems))
    problems.raise_if_any()
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return type(policy)(**{**policy.__dict__, "sha256": digest, "source": source})


def load_policy(path: str | os.PathLike[str]) -> ExportPolicy | IngestPolicy:
    """Read a policy file.  Its ``sha256`` is over the exact bytes (what approvers sign)."""
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read policy {path}: {e.strerror}", hint="check the path") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text") from e
    return policy_from_text(text, str(path))  # UTF-8 round-trips, so sha256 is over the file's bytes


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
