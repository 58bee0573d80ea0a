"""Private key files: the identity's secrets encrypted at rest, written atomically with mode 0600.

Format (FORMAT.md section 3.2): a TOML file holding the public fields in the
clear (so ``keys show`` works without the passphrase) and the 64 secret bytes
encrypted with XChaCha20-Poly1305 under a key derived from the passphrase with
Argon2id.  The associated data binds the ciphertext to the file's key id and KDF
parameters, so swapping fields between files is detected.  ``protection =
"none-INSECURE"`` stores the secret unencrypted; only ``--insecure-no-passphrase``
(tests, demos) writes it and every load warns.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import nacl.exceptions
import nacl.utils
from nacl.bindings import (
    crypto_aead_xchacha20poly1305_ietf_decrypt,
    crypto_aead_xchacha20poly1305_ietf_encrypt,
)
from nacl.pwhash import argon2id

from .._internal.atomic import atomic_write_bytes
from .._internal.compat import tomllib
from .._internal.encoding import b64decode, b64encode
from ..errors import KeyMaterialError, PassphraseError, ResourceError
from .identity import Identity, PublicIdentity

__all__ = [
    "PRIVATE_FORMAT",
    "KdfParams",
    "MODERATE_KDF",
    "FAST_INSECURE_KDF",
    "private_key_text",
    "identity_from_text",
    "save_identity",
    "load_identity",
    "load_public",
    "is_protected",
    "UnsafePlaintextKeyWarning",
]

PRIVATE_FORMAT = "secure-oneshot-private-identity/v1"
PROTECTED = "argon2id-xchacha20poly1305"
UNPROTECTED = "none-INSECURE"
_AAD_LABEL = b"secure-oneshot/v1 private key\x00"
_NOT_PRIVATE_HINT = "pass the .key file, not the .pub file"


class UnsafePlaintextKeyWarning(UserWarning):
    """A private key file without passphrase protection was written or read."""


class KdfParams:
    """Argon2id cost parameters (stored in the file so they can be raised later)."""

    def __init__(self, opslimit: int, memlimit: int) -> None:
        if opslimit < argon2id.OPSLIMIT_MIN or memlimit < argon2id.MEMLIMIT_MIN:
            raise ValueError("Argon2id parameters below libsodium's minimum")
        self.opslimit, self.memlimit = opslimit, memlimit


# libsodium's "moderate" profile: about a second and 256 MiB per unlock.
MODERATE_KDF = KdfParams(argon2id.OPSLIMIT_MODERATE, argon2id.MEMLIMIT_MODERATE)
# For tests only: fast, still Argon2id, still authenticated.
FAST_INSECURE_KDF = KdfParams(argon2id.OPSLIMIT_MIN, argon2id.MEMLIMIT_MIN)


def _aad(key_id: str, protection: str, kdf: KdfParams) -> bytes:
    return _AAD_LABEL + f"{key_id}\x00{protection}\x00{kdf.opslimit}\x00{kdf.memlimit}".encode("ascii")


def _header_lines(public: PublicIdentity) -> list[str]:
    return [
        "# secure-oneshot PRIVATE identity. KEEP SECRET: never email, commit or print this file.",
        f'format = "{PRIVATE_FORMAT}"',
        *(f'{k} = "{v}"' for k, v in public.public_fields().items()),
    ]


def private_key_text(identity: Identity, passphrase: bytes | None, kdf: KdfParams = MODERATE_KDF) -> str:
    """Render the private key file; ``passphrase=None`` means unprotected (insecure)."""
    lines = _header_lines(identity.public)
    if passphrase is None:
        warnings.warn("writing a private key WITHOUT passphrase protection", UnsafePlaintextKeyWarning, stacklevel=2)
        lines += [f'protection = "{UNPROTECTED}"', f'secret = "{b64encode(identity.secret_bytes())}"']
        return "\n".join(lines) + "\n"
    if not passphrase:
        raise PassphraseError("empty passphrase", hint="choose a passphrase, or --insecure-no-passphrase for tests")
    salt = nacl.utils.random(argon2id.SALTBYTES)
    nonce = nacl.utils.random(24)
    key = argon2id.kdf(32, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit)
    aad = _aad(identity.key_id, PROTECTED, kdf)
    ciphertext = crypto_aead_xchacha20poly1305_ietf_encrypt(identity.secret_bytes(), aad, nonce, key)
    lines += [
        f'protection = "{PROTECTED}"',
        f"argon2id_opslimit = {kdf.opslimit}",
        f"argon2id_memlimit = {kdf.memlimit}",
        f'salt = "{b64encode(salt)}"',
        f'nonce = "{b64encode(nonce)}"',
        f'ciphertext = "{b64encode(ciphertext)}"',
    ]
    return "\n".join(lines) + "\n"


def _field(fields: dict[str, object], name: str, source: str, length: int | None = None) -> bytes:
    try:
        return b64decode(str(fields[name]), length=length)
    except KeyError as e:
        raise KeyMaterialError(f"{source}: missing field {name!r}") from e
    except ValueError as e:
        raise KeyMaterialError(f"{source}: field {name!r} is damaged ({e})") from e


def _decrypt_secret(fields: dict[str, object], key_id: str, passphrase: bytes | None, source: str) -> bytes:
    if passphrase is None:
        raise PassphraseError(f"{source} is passphrase-protected and no passphrase was given")
    try:
        kdf = KdfParams(int(fields["argon2id_opslimit"]), int(fields["argon2id_memlimit"]))  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as e:
        raise KeyMaterialError(f"{source}: missing or invalid Argon2id parameters") from e
    salt = _field(fields, "salt", source, argon2id.SALTBYTES)
    nonce = _field(fields, "nonce", source, 24)
    key = argon2id.kdf(32, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit)
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(
            _field(fields, "ciphertext", source, 64 + 16), _aad(key_id, PROTECTED, kdf), nonce, key
        )
    except nacl.exceptions.CryptoError as e:
        raise PassphraseError(f"wrong passphrase for {source} (or the file was modified)") from e


def identity_from_text(text: str, passphrase: bytes | None, source: str = "<private key>") -> Identity:
    """Decrypt a private key file's text into an :class:`Identity`.

    Raises:
        KeyMaterialError: not a private key file, or damaged.
        PassphraseError: wrong or missing passphrase.
    """
    try:
        fields = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KeyMaterialError(f"{source}: not a secure-oneshot private key file") from e
    if fields.get("format") != PRIVATE_FORMAT:
        raise KeyMaterialError(
            f"{source}: not a private key file (format {fields.get('format')!r})",
            hint=_NOT_PRIVATE_HINT,
        )
    public = PublicIdentity.from_fields(fields, source)
    protection = fields.get("protection")
    if protection == UNPROTECTED:
        warnings.warn(f"{source} is not passphrase-protected", UnsafePlaintextKeyWarning, stacklevel=2)
        secret = _field(fields, "secret", source, 64)
    elif protection == PROTECTED:
        secret = _decrypt_secret(fields, public.key_id, passphrase, source)
    else:
        raise KeyMaterialError(f"{source}: unknown protection {protection!r}")
    identity = Identity(public.name, secret[:32], secret[32:])
    if identity.public != public:
        raise KeyMaterialError(f"{source}: secret keys do not match the public keys in the file")
    return identity


def save_identity(
    identity: Identity,
    directory: str | os.PathLike[str],
    passphrase: bytes | None,
    *,
    kdf: KdfParams = MODERATE_KDF,
    overwrite: bool = False,
) -> tuple[Path, Path]:
    """Write ``NAME.key`` (mode 0600) and ``NAME.pub`` (mode 0644) atomically.

    Returns:
        (private_path, public_path)

    Raises:
        ResourceError: the folder is not writable or a file exists and ``overwrite`` is False.
    """
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ResourceError(f"cannot use {folder} as the key folder: {e.strerror}", hint="give --out a folder path") from e
    private_path, public_path = folder / f"{identity.name}.key", folder / f"{identity.name}.pub"
    text = private_key_text(identity, passphrase, kdf)
    if not overwrite and public_path.exists():
        raise ResourceError(f"{public_path} already exists", hint="choose another name or folder, or pass --force")
    atomic_write_bytes(private_path, text.encode("ascii"), mode=0o600, overwrite=overwrite)
    try:
        atomic_write_bytes(public_path, identity.public.to_text().encode("ascii"), mode=0o644, overwrite=overwrite)
    except BaseException:
        # An identity is the pair: do not leave a new private key without its public file.
        private_path.unlink(missing_ok=True)
        raise
    return private_path, public_path


def _read_text(path: str | os.PathLike[str]) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise KeyMaterialError(f"key file {path} not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise KeyMaterialError(f"cannot read key file {path}: {e}") from e


def load_identity(path: str | os.PathLike[str], passphrase: bytes | None) -> Identity:
    """Load and decrypt a private key file (see :func:`identity_from_text`)."""
    return identity_from_text(_read_text(path), passphrase, str(path))


def is_protected(path: str | os.PathLike[str]) -> bool:
    """True if the private key file at ``path`` needs a passphrase (checked without decrypting)."""
    try:
        fields = tomllib.loads(_read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise KeyMaterialError(f"{path}: not a secure-oneshot private key file") from e
    if fields.get("format") != PRIVATE_FORMAT:
        raise KeyMaterialError(f"{path}: not a private key file (format {fields.get('format')!r})", hint=_NOT_PRIVATE_HINT)
    return fields.get("protection") != UNPROTECTED


def load_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """Load the public identity from a ``.pub`` file or the public part of a ``.key`` file."""
    return PublicIdentity.from_text(_read_text(path), str(path))
