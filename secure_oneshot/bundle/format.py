"""Implements FORMAT.md v1: constants, header/manifest (de)serialisation and the key schedule.

Pure: bytes in, objects out; no files, no clocks.  Every parse error is a
:class:`BundleFormatError` naming the field.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._internal.encoding import (
    b64decode,
    b64encode,
    canonical_json,
    parse_strict_json,
    parse_time,
)
from ..errors import BundleAuthError, BundleFormatError

__all__ = [
    "MAGIC",
    "FORMAT",
    "MANIFEST_FORMAT",
    "TAG_SIZE",
    "MAC_SIZE",
    "SIGNATURE_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "MAX_PAYLOAD_SIZE",
    "MAX_TRAILER_LEN",
    "MAX_JSON_DEPTH",
    "Stanza",
    "Header",
    "Manifest",
    "hkdf",
    "mac_key",
    "header_mac",
    "stream_key",
    "signed_message",
    "ciphertext_length",
    "check_stream_length",
]

MAGIC = b"secure-oneshot/v1\n"
FORMAT = "secure-oneshot/v1"
MANIFEST_FORMAT = "secure-oneshot/v1 manifest"
MAX_HEADER_LEN = 65536
MAX_MANIFEST_LEN = 1 << 20
MAX_PAYLOAD_SIZE = 1 << 36  # 64 GiB: the format's own maximum, whatever a reader's limit
MAX_JSON_DEPTH = 32  # nesting of arrays/objects in the header, manifest and safetensors header
MAX_RECIPIENTS = 16
MIN_CHUNK_SIZE, MAX_CHUNK_SIZE = 1 << 16, 1 << 24
DEFAULT_CHUNK_SIZE = 1 << 20
TAG_SIZE = 16
MAC_SIZE = 32
SIGNATURE_SIZE = 64
WRAPPED_KEY_SIZE = 32 + TAG_SIZE
MIN_TRAILER_LEN = 4 + 1 + SIGNATURE_SIZE  # u32be(manifest_len) || manifest || signature
MAX_TRAILER_LEN = 4 + MAX_MANIFEST_LEN + SIGNATURE_SIZE

WRAP_INFO = b"secure-oneshot/v1 x25519 wrap"
MAC_INFO = b"secure-oneshot/v1 header mac"
STREAM_INFO = b"secure-oneshot/v1 payload"
SIGNATURE_LABEL = b"secure-oneshot/v1 manifest\x00"

_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^([0-9a-f]{64})?$")
_POLICY_ID = re.compile(r"^[A-Za-z0-9._:/@+-]{0,128}$")


def _fail(where: str, why: str) -> BundleFormatError:
    return BundleFormatError(f"bundle {where}: {why}")


def _take(obj: dict[str, Any], name: str, kind: type, where: str) -> Any:
    value = obj.get(name)
    # bool is an int subclass in Python; JSON true must never pass as a size.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _fail(where, f"field {name!r} must be a {kind.__name__}")
    return value


def _exact_fields(obj: Any, expected: set[str], where: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise _fail(where, "must be a JSON object")
    missing, extra = expected - set(obj), set(obj) - expected
    if missing or extra:
        raise _fail(where, f"missing fields {sorted(missing)}, unknown fields {sorted(extra)}")
    return obj


def _key_id(value: Any, where: str) -> str:
    if not isinstance(value, str) or not _HEX32.match(value):
        raise _fail(where, "key ids and bundle ids are 32 lowercase hex digits")
    return value


def _check_common(fields: dict[str, Any], where: str) -> None:
    """Checks shared by header and manifest: ids, times, policy id, payload size."""
    _key_id(fields["bundle_id"], f"{where}.bundle_id")
    _key_id(fields["sender"], f"{where}.sender")
    try:
        created, expires = parse_time(_take(fields, "created", str, where)), parse_time(_take(fields, "expires", str, where))
    except ValueError as e:
        raise _fail(where, str(e)) from e
    if expires <= created:
        raise _fail(where, "expires must be after created")
    if not _POLICY_ID.match(_take(fields, "policy_id", str, where)):
        raise _fail(where, "policy_id has characters outside [A-Za-z0-9._:/@+-] or is over 128 long")
    if not 0 <= _take(fields, "payload_size", int, where) <= MAX_PAYLOAD_SIZE:
        raise _fail(where, f"payload_size out of range 0..{MAX_PAYLOAD_SIZE} (64 GiB)")


@dataclass(frozen=True)
class Stanza:
    """The file key wrapped to one recipient (FORMAT.md 5.2)."""

    key_id: str
    epk: bytes
    wrapped_key: bytes

    def to_json(self) -> dict[str, str]:
        return {"key_id": self.key_id, "epk": b64encode(self.epk), "wrapped_key": b64encode(self.wrapped_key)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> Stanza:
        obj = _exact_fields(obj, {"key_id", "epk", "wrapped_key"}, where)
        try:
            epk = b64decode(_take(obj, "epk", str, where), length=32)
            wrapped = b64decode(_take(obj, "wrapped_key", str, where), length=WRAPPED_KEY_SIZE)
        except ValueError as e:
            raise _fail(where, str(e)) from e
        return cls(_key_id(obj["key_id"], f"{where}.key_id"), epk, wrapped)


@dataclass(frozen=True)
class Header:
    """The public header (FORMAT.md 4.2): readable without keys, MACed with the file key."""

    bundle_id: str
    sender: str
    recipients: tuple[Stanza, ...]
    created: str
    expires: str
    policy_id: str
    payload_size: int
    chunk_size: int = DEFAULT_CHUNK_SIZE

    FIELDS = frozenset({"format", "bundle_id", "sender", "recipients", "created", "expires", "policy_id", "payload_size", "chunk_size"})

    @property
    def recipient_ids(self) -> tuple[str, ...]:
        return tuple(s.key_id for s in self.recipients)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "bundle_id": self.bundle_id,
            "sender": self.sender,
            "recipients": [s.to_json() for s in self.recipients],
            "created": self.created,
            "expires": self.expires,
            "policy_id": self.policy_id,
            "payload_size": self.payload_size,
            "chunk_size": self.chunk_size,
        }

    def to_bytes(self) -> bytes:
        """``magic || u32be(len) || header`` -- everything the header MAC covers."""
        body = canonical_json(self.to_json())
        if len(body) > MAX_HEADER_LEN:
            raise _fail("header", f"{len(body)} bytes exceeds {MAX_HEADER_LEN}")
        return MAGIC + len(body).to_bytes(4, "big") + body

    @classmethod
    def from_json_bytes(cls, body: bytes) -> Header:
        """Parse and validate header JSON (FORMAT.md 7 step 2)."""
        try:
            obj = parse_strict_json(body, canonical=True, max_depth=MAX_JSON_DEPTH, max_bytes=MAX_HEADER_LEN)
        except ValueError as e:
            raise _fail("header", str(e)) from e
        obj = _exact_fields(obj, set(cls.FIELDS), "header")
        if obj["format"] != FORMAT:
            raise _fail("header", f"unsupported format {obj['format']!r}")
        _check_common(obj, "header")
        stanzas = _take(obj, "recipients", list, "header")
        if not 1 <= len(stanzas) <= MAX_RECIPIENTS:
            raise _fail("header", f"needs 1..{MAX_RECIPIENTS} recipients")
        recipients = tuple(Stanza.from_json(s, f"header.recipients[{i}]") for i, s in enumerate(stanzas))
        if len({s.key_id for s in recipients}) != len(recipients):
            raise _fail("header", "duplicate recipient key ids")
        chunk = _take(obj, "chunk_size", int, "header")
        if chunk & (chunk - 1) or not MIN_CHUNK_SIZE <= chunk <= MAX_CHUNK_SIZE:
            raise _fail("header", "chunk_size must be a power of two between 64 KiB and 16 MiB")
        return cls(obj["bundle_id"], obj["sender"], recipients, obj["created"], obj["expires"], obj["policy_id"], obj["payload_size"], chunk)


@dataclass(frozen=True)
class Manifest:
    """What the sender signs (FORMAT.md 4.3)."""

    bundle_id: str
    sender: str
    recipients: tuple[str, ...]
    created: str
    expires: str
    policy_id: str
    payload_size: int
    payload_sha256: str
    policy_sha256: str = ""
    dp: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    FIELDS = frozenset({
        "format", "bundle_id", "sender", "recipients", "created", "expires", "policy_id",
        "payload_size", "payload_sha256", "policy_sha256", "dp", "meta",
    })

    def to_json(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "bundle_id": self.bundle_id,
            "sender": self.sender,
            "recipients": list(self.recipients),
            "created": self.created,
            "expires": self.expires,
            "policy_id": self.policy_id,
            "payload_size": self.payload_size,
            "payload_sha256": self.payload_sha256,
            "policy_sha256": self.policy_sha256,
            "dp": self.dp,
            "meta": self.meta,
        }

    def to_bytes(self) -> bytes:
        try:
            return canonical_json(self.to_json())
        except ValueError as e:
            raise ValueError(f"manifest: {e}") from e

    @classmethod
    def from_bytes(cls, body: bytes) -> Manifest:
        """Parse and validate the (already signature-checked) manifest."""
        try:
            obj = parse_strict_json(body, canonical=True, max_depth=MAX_JSON_DEPTH, max_bytes=MAX_MANIFEST_LEN)
        except ValueError as e:
            raise _fail("manifest", str(e)) from e
        obj = _exact_fields(obj, set(cls.FIELDS), "manifest")
        if obj["format"] != MANIFEST_FORMAT:
            raise _fail("manifest", f"unsupported format {obj['format']!r}")
        _check_common(obj, "manifest")
        recipients = tuple(_key_id(r, "manifest.recipients") for r in _take(obj, "recipients", list, "manifest"))
        for name, pattern in (("payload_sha256", _HEX64), ("policy_sha256", _HEX64)):
            if not pattern.match(_take(obj, name, str, "manifest")):
                raise _fail("manifest", f"{name} must be 64 hex digits")
        if not obj["payload_sha256"]:
            raise _fail("manifest", "payload_sha256 must not be empty")
        return cls(
            obj["bundle_id"], obj["sender"], recipients, obj["created"], obj["expires"], obj["policy_id"],
            obj["payload_size"], obj["payload_sha256"], obj["policy_sha256"],
            _take(obj, "dp", dict, "manifest"), _take(obj, "meta", dict, "manifest"),
        )

    def disagreements(self, header: Header) -> list[str]:
        """Names of the fields where this manifest and ``header`` differ (FORMAT.md 7 step 11)."""
        pairs = {
            "bundle_id": (self.bundle_id, header.bundle_id),
            "sender": (self.sender, header.sender),
            "recipients": (self.recipients, header.recipient_ids),
            "created": (self.created, header.created),
            "expires": (self.expires, header.expires),
            "policy_id": (self.policy_id, header.policy_id),
            "payload_size": (self.payload_size, header.payload_size),
        }
        return [name for name, (mine, theirs) in pairs.items() if mine != theirs]


def hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    """HKDF-SHA-256 with a 32-byte output."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(ikm)


def mac_key(file_key: bytes) -> bytes:
    return hkdf(file_key, b"", MAC_INFO)


def header_mac(file_key: bytes, header_bytes: bytes) -> bytes:
    """HMAC-SHA-256 over ``magic || u32be(len) || header`` (FORMAT.md 5.3)."""
    return hmac.new(mac_key(file_key), header_bytes, hashlib.sha256).digest()


def stream_key(file_key: bytes, header_bytes: bytes) -> bytes:
    """The payload stream key, bound to every header byte (FORMAT.md 5.5)."""
    return hkdf(file_key, hashlib.sha256(header_bytes).digest(), STREAM_INFO)


def signed_message(manifest_bytes: bytes) -> bytes:
    """The exact bytes the sender's Ed25519 key signs (FORMAT.md 4.1)."""
    return SIGNATURE_LABEL + manifest_bytes


def ciphertext_length(plaintext_length: int, chunk_size: int) -> int:
    """Bytes of the encrypted stream of a (non-empty) plaintext: one tag per chunk (FORMAT.md 6)."""
    return plaintext_length + -(-plaintext_length // chunk_size) * TAG_SIZE


def check_stream_length(header: Header, stream_length: int) -> None:
    """FORMAT.md 7 step 2: the file's real stream length must fit ``payload_size`` plus a trailer.

    Pure integer arithmetic on the header and the file's size (``fstat``), done
    before anything is read or allocated, so a header claiming a huge payload in
    a small file, or a sparse terabyte file, costs nothing.

    Raises:
        BundleAuthError: the stream is shorter than the header needs (truncated or modified).
        BundleFormatError: the stream is longer than any trailer could explain.
    """
    shortest = ciphertext_length(header.payload_size + MIN_TRAILER_LEN, header.chunk_size)
    longest = ciphertext_length(header.payload_size + MAX_TRAILER_LEN, header.chunk_size)
    if stream_length < shortest:
        raise BundleAuthError(
            f"encrypted stream of {stream_length} bytes is too short for a {header.payload_size}-byte payload "
            f"(at least {shortest}): the bundle was truncated or modified",
        )
    if stream_length > longest:
        raise _fail("stream", f"{stream_length} bytes is longer than a {header.payload_size}-byte payload "
                              f"and the largest manifest allow ({longest}); the header's sizes do not match the file")
