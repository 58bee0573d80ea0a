"""Canonical JSON, base64 and timestamp helpers shared by keys, bundles and ledgers.

Canonical JSON here is: UTF-8, keys sorted, no insignificant whitespace,
non-ASCII escaped as ``\\uXXXX``, and **no floating-point numbers** (reals travel
as decimal strings) so that a second implementation in any language can
reproduce the bytes.  FORMAT.md section 4 is the normative text.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from datetime import datetime, timezone
from typing import Any

__all__ = [
    "canonical_json",
    "parse_strict_json",
    "json_depth",
    "DEFAULT_MAX_JSON_DEPTH",
    "DEFAULT_MAX_JSON_BYTES",
    "b64encode",
    "b64decode",
    "format_time",
    "parse_time",
    "utc_now",
    "MAX_SAFE_INT",
]

MAX_SAFE_INT = 2**53 - 1
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def _check_value(value: Any, where: str) -> None:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INT:
            raise ValueError(f"{where}: integer {value} is outside +/-(2^53-1)")
        return
    if isinstance(value, float):
        raise ValueError(f"{where}: floats are not allowed in canonical JSON; encode reals as decimal strings")
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where}: object keys must be strings")
            _check_value(item, f"{where}.{key}")
        return
    raise ValueError(f"{where}: {type(value).__name__} is not a JSON value")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to canonical JSON bytes (raises ``ValueError`` on floats)."""
    _check_value(value, "$")
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


DEFAULT_MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays/objects :func:`parse_strict_json` accepts by default."""

DEFAULT_MAX_JSON_BYTES = 16 << 20
"""Largest input :func:`parse_strict_json` accepts by default (16 MiB)."""

# A JSON string: quote, then runs of plain characters or backslash escapes, then quote.
# Unrolled so that it runs in linear time, and on bytes: '"' and '\\' never occur
# inside a multi-byte UTF-8 sequence.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(rb"[^\[\]{}]+")


def json_depth(data: bytes) -> int:
    """Deepest array/object nesting in ``data``, counted without parsing (no recursion).

    Strings are removed first, so brackets inside them do not count.  For any
    prefix that a JSON parser accepts, the count equals the parser's nesting, so
    bounding it bounds the parser's recursion; on malformed input it is an upper
    bound up to the first error, which is where a parser stops.
    """
    brackets = _NOT_BRACKET.sub(b"", _JSON_STRING.sub(b"", data))
    openers = brackets.count(b"[") + brackets.count(b"{")
    if openers <= 1:
        return openers
    depth = deepest = 0
    for byte in brackets:  # only bracket bytes remain: cheap even for 100,000 of them
        depth += 1 if byte in (0x5B, 0x7B) else -1
        deepest = max(deepest, depth)
    return deepest


def parse_strict_json(
    data: bytes | bytearray | memoryview,
    *,
    canonical: bool,
    max_depth: int = DEFAULT_MAX_JSON_DEPTH,
    max_bytes: int = DEFAULT_MAX_JSON_BYTES,
) -> Any:
    """Parse JSON, rejecting duplicate keys, NaN/Infinity, and (if ``canonical``) non-canonical bytes.

    Size and nesting are checked before ``json.loads`` runs, so hostile input
    (a 100,000-deep ``[[[...``) is a ``ValueError``, never a ``RecursionError``
    or a large allocation.

    Args:
        data: the JSON text as bytes.
        canonical: also require canonical form (FORMAT.md section 1).
        max_depth: most nested arrays/objects allowed (``[]`` is depth 1).
        max_bytes: longest input allowed.

    Raises:
        ValueError: with a short reason (callers wrap it in their own error class).
    """
    if len(data) > max_bytes:
        raise ValueError(f"JSON of {len(data)} bytes exceeds the {max_bytes}-byte limit")
    raw = bytes(data)
    if json_depth(raw) > max_depth:
        raise ValueError(f"JSON nested deeper than {max_depth} levels")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError("not valid UTF-8") from e
    try:
        value = json.loads(text, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e.msg} at byte {e.pos})") from e
    if canonical and canonical_json(value) != raw:
        raise ValueError("JSON is not in canonical form (sorted keys, no whitespace, ASCII, no floats)")
    return value


def b64encode(data: bytes) -> str:
    """Standard base64 with padding (RFC 4648 section 4)."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str, *, length: int | None = None) -> bytes:
    """Strict base64 decode; ``length`` checks the decoded size.  Raises ``ValueError``."""
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as e:
        raise ValueError("invalid base64") from e
    if b64encode(raw) != text:
        raise ValueError("non-canonical base64")
    if length is not None and len(raw) != length:
        raise ValueError(f"expected {length} bytes, got {len(raw)}")
    return raw


def utc_now() -> datetime:
    """The current time, UTC, truncated to whole seconds (the format's resolution)."""
    return datetime.now(timezone.utc).replace(microsecond=0)


def format_time(moment: datetime) -> str:
    """RFC 3339 UTC with whole seconds, e.g. ``2026-11-26T15:20:00Z``."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return moment.astimezone(timezone.utc).strftime(_TIME_FORMAT)


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time`; only that exact form is accepted.  Raises ``ValueError``."""
    try:
        moment = datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=timezone.utc)
    except (TypeError, ValueError) as e:
        raise ValueError(f"timestamp {text!r} is not of the form YYYY-MM-DDTHH:MM:SSZ") from e
    if format_time(moment) != text:
        raise ValueError(f"timestamp {text!r} is not canonical")
    return moment
