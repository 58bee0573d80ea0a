"""Identities: an Ed25519 signing key plus an X25519 encryption key, and their key id.

A *public identity* is what a site or server shares: a name, the two public keys
and a short key id a person can read over the phone.  A private :class:`Identity`
holds the secret halves; its ``repr`` shows only the name and key id so secrets
never reach logs.  This module is pure: reading and writing files lives in
``keyfile.py``.
"""

from __future__ import annotations

import hashlib
import re
from .._internal.compat import tomllib
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult
from nacl.exceptions import BadSignatureError
from nacl.public import PrivateKey, PublicKey
from nacl.signing import SigningKey, VerifyKey

from .._internal.encoding import b64decode, b64encode
from ..errors import KeyMaterialError

__all__ = ["PublicIdentity", "Identity", "compute_key_id", "format_key_id", "PUBLIC_FORMAT"]

PUBLIC_FORMAT = "secure-oneshot-public-identity/v1"
KEY_ID_LABEL = b"secure-oneshot/v1 key id\x00"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_KEY_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def compute_key_id(sign_public: bytes, encrypt_public: bytes) -> str:
    """Key id = first 16 bytes of SHA-256(label || Ed25519 pk || X25519 pk), lowercase hex (FORMAT.md 3)."""
    return hashlib.sha256(KEY_ID_LABEL + sign_public + encrypt_public).digest()[:16].hex()


def format_key_id(key_id: str) -> str:
    """Group a key id in blocks of four for reading aloud: ``1a2b 3c4d ...``."""
    return " ".join(key_id[i : i + 4] for i in range(0, len(key_id), 4))


def check_name(name: str) -> str:
    """Validate an identity name (letters, digits, ``._-``, at most 64 characters)."""
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise KeyMaterialError(
            f"invalid identity name {name!r}",
            hint="use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def check_key_id(key_id: object) -> str:
    """Return ``key_id`` if it is 32 lowercase hex digits, else raise ``ValueError``."""
    if not isinstance(key_id, str) or not _KEY_ID_RE.match(key_id):
        raise ValueError(f"key id must be 32 lowercase hex digits, got {key_id!r}")
    return key_id


@dataclass(frozen=True)
class PublicIdentity:
    """The shareable half of an identity.

    Attributes:
        name: human-readable label (not authenticated; the key id is what counts).
        sign_public: 32-byte Ed25519 public key.
        encrypt_public: 32-byte X25519 public key.
    """

    name: str
    sign_public: bytes
    encrypt_public: bytes

    def __post_init__(self) -> None:
        check_name(self.name)
        if len(self.sign_public) != 32 or len(self.encrypt_public) != 32:
            raise KeyMaterialError("public keys must be 32 bytes each")

    @property
    def key_id(self) -> str:
        return compute_key_id(self.sign_public, self.encrypt_public)

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True iff ``signature`` is a valid Ed25519 signature of ``message`` by this identity."""
        try:
            VerifyKey(self.sign_public).verify(message, signature)
        except BadSignatureError:
            return False
        return True

    def public_fields(self) -> dict[str, str]:
        """The fields every identity file carries, in display order."""
        return {
            "name": self.name,
            "key_id": self.key_id,
            "sign_ed25519": b64encode(self.sign_public),
            "encrypt_x25519": b64encode(self.encrypt_public),
        }

    def to_text(self) -> str:
        """The ``.pub`` file: small TOML a person can email and read over the phone."""
        f = self.public_fields()
        return (
            "# secure-oneshot public identity. Safe to share.\n"
            "# Before trusting it, confirm the key id with its owner by phone:\n"
            f"#   {format_key_id(f['key_id'])}\n"
            f'format = "{PUBLIC_FORMAT}"\n'
            + "".join(f'{k} = "{v}"\n' for k, v in f.items())
        )

    @classmethod
    def from_fields(cls, fields: dict[str, object], source: str) -> PublicIdentity:
        """Build from parsed TOML fields, checking that the key id matches the keys."""
        for field in ("name", "key_id", "sign_ed25519", "encrypt_x25519"):
            if field not in fields:
                raise KeyMaterialError(f"{source}: missing field {field!r}")
            if not isinstance(fields[field], str):
                raise KeyMaterialError(f"{source}: field {field!r} must be a string, not {type(fields[field]).__name__}")
        try:
            identity = cls(
                name=str(fields["name"]),
                sign_public=b64decode(str(fields["sign_ed25519"]), length=32),
                encrypt_public=b64decode(str(fields["encrypt_x25519"]), length=32),
            )
        except ValueError as e:
            raise KeyMaterialError(f"{source}: bad public key ({e})") from e
        if fields.get("key_id") != identity.key_id:
            raise KeyMaterialError(
                f"{source}: key_id does not match the public keys (file edited or corrupted)",
                hint="get a fresh copy of the public identity from its owner",
            )
        return identity

    @classmethod
    def from_text(cls, text: str, source: str = "<public identity>") -> PublicIdentity:
        """Parse a ``.pub`` file (or the public part of a private key file)."""
        try:
            fields = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise KeyMaterialError(f"{source}: not a secure-oneshot identity file ({e})") from e
        if fields.get("format") not in (PUBLIC_FORMAT, "secure-oneshot-private-identity/v1"):
            raise KeyMaterialError(f"{source}: not a secure-oneshot identity file (format {fields.get('format')!r})")
        return cls.from_fields(fields, source)


class Identity:
    """A private identity.  Never printed: ``repr`` shows the name and key id only.

    >>> alice = Identity.generate("alice")
    >>> alice.public.verify(b"hi", alice.sign(b"hi"))
    True
    """

    __slots__ = ("name", "_signing_key", "_private_key")

    def __init__(self, name: str, signing_seed: bytes, encrypt_secret: bytes) -> None:
        self.name = check_name(name)
        self._signing_key = SigningKey(signing_seed)
        self._private_key = PrivateKey(encrypt_secret)

    @classmethod
    def generate(cls, name: str) -> Identity:
        """A fresh identity from the OS random source."""
        return cls(name, bytes(SigningKey.generate()), bytes(PrivateKey.generate()))

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, bytes(self._signing_key.verify_key), bytes(self._private_key.public_key))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def secret_bytes(self) -> bytes:
        """Ed25519 seed || X25519 secret (64 bytes).  Only ``keyfile`` should call this."""
        return bytes(self._signing_key) + bytes(self._private_key)

    def sign(self, message: bytes) -> bytes:
        """Detached Ed25519 signature (64 bytes)."""
        return self._signing_key.sign(message).signature

    def x25519(self, peer_public: bytes) -> bytes:
        """Raw X25519 shared secret with ``peer_public`` (callers reject all-zero outputs)."""
        return crypto_scalarmult(bytes(self._private_key), bytes(PublicKey(peer_public)))

    def __repr__(self) -> str:
        return f"Identity(name={self.name!r}, key_id={self.key_id!r})"

    __str__ = __repr__
