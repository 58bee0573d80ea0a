"""Private key files: the identity's secrets encrypted at rest, written atomically with mode 0600.

Format (FORMAT.md section 3.2): a TOML file holding the public fields in the
clear (so ``keys show`` works without the passphrase) and the 64 secret bytes
encrypted with XChaCha20-Poly1305 under a key derived from the passphrase with
Argon2id.  The associated data binds the ciphertext to the file's key id and KDF
parameters, so swapping fields between files is detected.  ``protection =
"none-INSECURE"`` stores the secret unencrypted; only ``--insecure-no-passphrase``
(tests, demos) writes it and every load warns.

Reading is strict, because a key file is also an input an attacker may have
edited: the file must be a regular file of at most ``MAX_KEY_FILE_BYTES``; a
private key file accessible to group or others is refused (as ``ssh`` does),
checked on the opened descriptor; the exact set of fields is required; and the
Argon2id costs must lie between libsodium's minimum and ``MAX_OPSLIMIT`` /
``MAX_MEMLIMIT`` before the KDF runs, so an edited file cannot make an unlock
allocate terabytes or run for hours.
"""

from __future__ import annotations

import os
import shlex
import stat
import warnings
from collections.abc import Callable
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
    "MAX_OPSLIMIT",
    "MAX_MEMLIMIT",
    "MAX_KEY_FILE_BYTES",
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


# Upper bounds on what a key file may ask of an unlock: libsodium's "sensitive"
# profile is 4 passes over 1 GiB (several seconds); these leave room to raise the
# cost above it while keeping a tampered file from demanding hours or terabytes.
MAX_OPSLIMIT = min(10, argon2id.OPSLIMIT_MAX)
MAX_MEMLIMIT = min(2 << 30, argon2id.MEMLIMIT_MAX)  # 2 GiB
MAX_KEY_FILE_BYTES = 64 * 1024  # a key file is about 600 bytes

PassphraseSource = Callable[[], bytes]


def kdf_problem(opslimit: object, memlimit: object) -> str | None:
    """Why these Argon2id costs are unacceptable, or None when they are fine."""
    bounds = (
        ("argon2id_opslimit", opslimit, argon2id.OPSLIMIT_MIN, MAX_OPSLIMIT),
        ("argon2id_memlimit", memlimit, argon2id.MEMLIMIT_MIN, MAX_MEMLIMIT),
    )
    for name, value, low, high in bounds:
        if type(value) is not int:  # bool is an int subclass, and floats or strings are not costs
            return f"{name} must be an integer, not {type(value).__name__}"
        if not low <= value <= high:
            return f"{name} = {value} is outside the accepted range {low}..{high}"
    return None


class KdfParams:
    """Argon2id cost parameters (stored in the file so they can be raised later)."""

    def __init__(self, opslimit: int, memlimit: int) -> None:
        problem = kdf_problem(opslimit, memlimit)
        if problem is not None:
            raise ValueError(f"Argon2id parameters: {problem}")
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


_COMMON_FIELDS = frozenset({"format", "name", "key_id", "sign_ed25519", "encrypt_x25519", "protection"})
_PROTECTION_FIELDS = {
    PROTECTED: frozenset({"argon2id_opslimit", "argon2id_memlimit", "salt", "nonce", "ciphertext"}),
    UNPROTECTED: frozenset({"secret"}),
}
_TAMPERED_HINT = "the key file was damaged or edited; restore it from your backup"


def _field(fields: dict[str, object], name: str, source: str, length: int | None = None) -> bytes:
    value = fields[name]  # presence was checked by _private_fields
    if not isinstance(value, str):
        raise KeyMaterialError(f"{source}: field {name!r} must be a base64 string", hint=_TAMPERED_HINT)
    try:
        return b64decode(value, length=length)
    except ValueError as e:
        raise KeyMaterialError(f"{source}: field {name!r} is damaged ({e})", hint=_TAMPERED_HINT) from e


def _private_fields(text: str, source: str, info: os.stat_result | None = None) -> dict[str, object]:
    """Parse a private key file and check its format, mode (``info``, when read from a file),
    protection and exact set of fields."""
    try:
        fields = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise KeyMaterialError(f"{source}: not a secure-oneshot private key file") from e
    if fields.get("format") != PRIVATE_FORMAT:
        raise KeyMaterialError(
            f"{source}: not a private key file (format {fields.get('format')!r})",
            hint=_NOT_PRIVATE_HINT,
        )
    if info is not None:
        _check_private_mode(info, source)
    protection = fields.get("protection")
    if not isinstance(protection, str) or protection not in _PROTECTION_FIELDS:
        raise KeyMaterialError(f"{source}: unknown protection {protection!r}", hint=_TAMPERED_HINT)
    expected = _COMMON_FIELDS | _PROTECTION_FIELDS[protection]
    missing, unknown = sorted(expected - fields.keys()), sorted(fields.keys() - expected)
    if missing:
        raise KeyMaterialError(f"{source}: missing field {missing[0]!r}", hint=_TAMPERED_HINT)
    if unknown:
        raise KeyMaterialError(f"{source}: unknown field {unknown[0]!r} in a {protection} private key file", hint=_TAMPERED_HINT)
    return fields


def _kdf_from_fields(fields: dict[str, object], source: str) -> KdfParams:
    problem = kdf_problem(fields["argon2id_opslimit"], fields["argon2id_memlimit"])
    if problem is not None:
        raise KeyMaterialError(f"{source}: {problem}", hint=_TAMPERED_HINT)
    return KdfParams(fields["argon2id_opslimit"], fields["argon2id_memlimit"])  # type: ignore[arg-type]


def _decrypt_secret(fields: dict[str, object], key_id: str, passphrase: bytes | PassphraseSource | None, source: str) -> bytes:
    # Every field is checked before the passphrase is asked for or the KDF runs.
    kdf = _kdf_from_fields(fields, source)
    salt = _field(fields, "salt", source, argon2id.SALTBYTES)
    nonce = _field(fields, "nonce", source, 24)
    ciphertext = _field(fields, "ciphertext", source, 64 + 16)
    if callable(passphrase):
        passphrase = passphrase()
    if passphrase is None:
        raise PassphraseError(f"{source} is passphrase-protected and no passphrase was given")
    key = argon2id.kdf(32, passphrase, salt, opslimit=kdf.opslimit, memlimit=kdf.memlimit)
    try:
        return crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, _aad(key_id, PROTECTED, kdf), nonce, key)
    except nacl.exceptions.CryptoError as e:
        raise PassphraseError(f"wrong passphrase for {source} (or the file was modified)") from e


def identity_from_text(
    text: str, passphrase: bytes | PassphraseSource | None, source: str = "<private key>", *, info: os.stat_result | None = None
) -> Identity:
    """Decrypt a private key file's text into an :class:`Identity`.

    Args:
        text: the file's content.
        passphrase: the passphrase, or a function asked for it only if the file is protected.
        source: how to name the file in errors.
        info: ``fstat`` of the descriptor the text was read from, to check its mode.

    Raises:
        KeyMaterialError: not a private key file, accessible to group or others, or damaged.
        PassphraseError: wrong or missing passphrase.
    """
    fields = _private_fields(text, source, info)
    public = PublicIdentity.from_fields(fields, source)
    if fields["protection"] == UNPROTECTED:
        warnings.warn(f"{source} is not passphrase-protected", UnsafePlaintextKeyWarning, stacklevel=2)
        secret = _field(fields, "secret", source, 64)
    else:
        secret = _decrypt_secret(fields, public.key_id, passphrase, source)
    identity = Identity(public.name, secret[:32], secret[32:])
    if identity.public != public:
        raise KeyMaterialError(f"{source}: secret keys do not match the public keys in the file", hint=_TAMPERED_HINT)
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

    A folder created here gets mode 0700.  An existing folder that every user
    can write to is refused: anyone could replace or delete the key files there.

    Returns:
        (private_path, public_path)

    Raises:
        ResourceError: the folder is not writable or world-writable, or a file
            exists and ``overwrite`` is False.
    """
    folder = Path(directory)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        folder_mode = stat.S_IMODE(folder.stat().st_mode)
    except OSError as e:
        raise ResourceError(f"cannot use {folder} as the key folder: {e.strerror}", hint="give --out a folder path") from e
    if os.name == "posix" and folder_mode & stat.S_IWOTH:
        raise ResourceError(
            f"refusing to write a private key into {folder} (mode {folder_mode:04o}): every user can write to that folder",
            hint=f"chmod o-w {shlex.quote(str(folder))}, or choose another --out folder",
        )
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


def _check_private_mode(info: os.stat_result, path: str) -> None:
    if os.name != "posix":
        return  # permission bits do not describe who can read a file on Windows
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise KeyMaterialError(
            f"private key file {path} has mode {mode:04o}: group or other users can access it",
            hint=f"chmod 600 {shlex.quote(path)}",
        )


def _read_text(path: str | os.PathLike[str]) -> tuple[str, os.stat_result]:
    """Read a key file through one descriptor; return its text and that descriptor's ``fstat``.

    The mode of a private key is judged from this ``fstat``, never from a second
    look at the path, which could by then name another file.
    """
    try:
        # O_NONBLOCK: opening a FIFO planted under the key's name must not hang.
        flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)
    except FileNotFoundError as e:
        raise KeyMaterialError(f"key file {path} not found") from e
    except (OSError, ValueError) as e:
        raise KeyMaterialError(f"cannot read key file {path}: {getattr(e, 'strerror', None) or e}") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise KeyMaterialError(f"key file {path} is not a regular file")
        raw = b""
        while len(raw) <= MAX_KEY_FILE_BYTES:
            block = os.read(fd, MAX_KEY_FILE_BYTES + 1 - len(raw))
            if not block:
                break
            raw += block
    except OSError as e:
        raise KeyMaterialError(f"cannot read key file {path}: {e.strerror or e}") from e
    finally:
        os.close(fd)
    if len(raw) > MAX_KEY_FILE_BYTES:
        raise KeyMaterialError(f"key file {path} is larger than {MAX_KEY_FILE_BYTES} bytes: not a key file")
    try:
        return raw.decode("utf-8"), info
    except UnicodeDecodeError as e:
        raise KeyMaterialError(f"key file {path} is not UTF-8 text: not a key file") from e


def load_identity(path: str | os.PathLike[str], passphrase: bytes | PassphraseSource | None) -> Identity:
    """Load and decrypt a private key file (see :func:`identity_from_text`).

    Raises:
        KeyMaterialError: missing, not a regular file, accessible to group or others, or damaged.
        PassphraseError: wrong or missing passphrase.
    """
    text, info = _read_text(path)
    return identity_from_text(text, passphrase, str(path), info=info)


def is_protected(path: str | os.PathLike[str]) -> bool:
    """True if the private key file at ``path`` needs a passphrase (checked without decrypting)."""
    text, info = _read_text(path)
    return _private_fields(text, str(path), info)["protection"] != UNPROTECTED


def load_public(path: str | os.PathLike[str]) -> PublicIdentity:
    """Load the public identity from a ``.pub`` file or the public part of a ``.key`` file."""
    return PublicIdentity.from_text(_read_text(path)[0], str(path))
