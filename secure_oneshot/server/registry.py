"""The server folder's storage: the one-run lock, the private staging area, and the accepted registry.

Layout under the server folder (``IngestFolders.under(root)``)::

    .lock                 flock: ingest holds it exclusively, distill shared
    .staging/             0700: each inbox file is copied here once, verified here,
                          then renamed into accepted/ or quarantine/ (same filesystem)
    accepted/<id>.sob     0600: the exact bytes that were verified
    accepted/<id>.json    0600: the registry entry (bundle id, file SHA-256, ingest policy, ...)
    quarantine/<t>-<r>.sob + .reason.json   0600: refused entries under generated names

This module moves and hashes bytes; it never parses a bundle.  Verification
is ``bundle.open_bundle``'s job, deciding is ``ingest``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .._internal.atomic import atomic_write_bytes
from .._internal.encoding import parse_strict_json
from .._internal.termsafe import printable
from ..bundle.format import MAC_SIZE, MAGIC, MAX_HEADER_LEN, MAX_MANIFEST_LEN, MIN_CHUNK_SIZE, SIGNATURE_SIZE, TAG_SIZE
from ..errors import BundleFormatError, ConfigError, ResourceError

__all__ = ["StagedFile", "server_lock", "private_dir", "bundle_file_limit", "stage_copy", "write_private_json",
           "read_registry_entry", "file_sha256", "generated_name", "BUNDLE_ID", "SHA256_HEX", "MAX_REGISTRY_ENTRY_BYTES"]

BUNDLE_ID = re.compile(r"[0-9a-f]{32}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
MAX_REGISTRY_ENTRY_BYTES = MAX_MANIFEST_LEN * 4  # the manifest (JSON-escaped at most ~2x) plus small fields
MAX_REGISTRY_DEPTH = 64
_COPY_CHUNK = 1 << 20


@contextlib.contextmanager
def server_lock(root: Path, *, shared: bool = False, wait: bool = False) -> Iterator[None]:
    """Hold ``root/.lock`` for the block: exclusive for ingest, shared for readers such as distill.

    Raises:
        ResourceError: another process holds it (and ``wait`` is False), or the lock file cannot be opened.
    """
    path = root / ".lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ResourceError(f"cannot open the server lock {path}: {e.strerror or e}", hint="check the server folder exists and is writable") from e
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError as e:
            who = "an ingest is running" if shared else "another ingest or a distill is using it"
            raise ResourceError(f"server folder {root} is busy: {who}",
                                hint="wait for it to finish, or pass --wait to queue behind it") from e
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or tighten an existing one to 0700; a symlink is refused."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise ResourceError(f"{path} is not a plain folder (a symlink or a file)", hint="remove it; the server recreates it")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.chmod(path, 0o700)
    except OSError as e:
        raise ResourceError(f"cannot prepare {path}: {e.strerror or e}", hint="check the server folder is writable") from e
    return path


def bundle_file_limit(max_payload_bytes: int) -> int:
    """The largest file a bundle with a payload of at most ``max_payload_bytes`` can be (FORMAT.md sections 3 and 6).

    magic + header length + the largest header + MAC, then the stream: payload and the largest manifest trailer,
    sealed in the smallest chunks allowed (one tag each, plus the final chunk).
    """
    plaintext = max_payload_bytes + 4 + MAX_MANIFEST_LEN + SIGNATURE_SIZE
    chunks = plaintext // MIN_CHUNK_SIZE + 1
    return len(MAGIC) + 4 + MAX_HEADER_LEN + MAC_SIZE + plaintext + chunks * TAG_SIZE


@dataclass(frozen=True)
class StagedFile:
    """A private copy of one inbox file: where it is, and the SHA-256 and length of its bytes."""

    path: Path
    sha256: str
    size: int


def stage_copy(src_fd: int, staging: Path, limit: int) -> StagedFile:
    """Copy everything readable from ``src_fd`` into a new 0600 file in ``staging``, hashing as it goes.

    Reads at most ``limit + 1`` bytes, so a file that grows while it is copied is refused rather than followed.

    Raises:
        BundleFormatError: more than ``limit`` bytes.
        ResourceError: the copy cannot be written.
    """
    path = staging / f"{secrets.token_hex(16)}.sob"
    try:
        out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise ResourceError(f"cannot create a staging file in {staging}: {e.strerror or e}", hint="check free disk space") from e
    digest, size = hashlib.sha256(), 0
    try:
        with os.fdopen(out, "wb") as dst:
            while chunk := os.read(src_fd, min(_COPY_CHUNK, limit + 1 - size)):
                size += len(chunk)
                if size > limit:
                    raise BundleFormatError(f"the file grew past {limit} bytes while it was read", hint="deliver bundles complete, then move them into the inbox")
                digest.update(chunk)
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise
    return StagedFile(path, digest.hexdigest(), size)


def file_sha256(path: Path, limit: int) -> str:
    """SHA-256 of a regular file (never through a symlink), refusing files over ``limit`` bytes.

    Raises:
        BundleFormatError: not a regular file, or too big.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise BundleFormatError(f"cannot open {path}: {e.strerror or e}", hint="the accepted folder was changed outside ingest") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            raise BundleFormatError(f"{path} is not a regular file of at most {limit} bytes", hint="the accepted folder was changed outside ingest")
        digest = hashlib.sha256()
        while chunk := os.read(fd, _COPY_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def generated_name(now: datetime) -> str:
    """``<UTC time>-<random hex>``: a quarantine name no inbox file name can influence or collide with."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(8)}"


def write_private_json(path: Path, value: dict[str, Any]) -> None:
    """Write ``value`` as indented ASCII JSON, atomically, mode 0600."""
    text = json.dumps(value, indent=2, sort_keys=True, ensure_ascii=True) + "\n"
    atomic_write_bytes(path, text.encode("ascii"), mode=0o600)


def read_registry_entry(path: Path) -> dict[str, Any]:
    """Parse one ``accepted/<id>.json`` with bounded size and nesting.

    Raises:
        ConfigError: unreadable, too big, too deep, or not a JSON object.
    """
    hint = "the accepted folder was changed outside ingest; remove the entry and its bundle, then ingest the bundle again"
    shown = printable(str(path), 300)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"registry entry {shown} is not a regular file", hint=hint)
            data = f.read(MAX_REGISTRY_ENTRY_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read registry entry {shown}: {e.strerror or e}", hint=hint) from e
    try:  # size and nesting are bounded before the parser recurses
        entry = parse_strict_json(data, canonical=False, max_depth=MAX_REGISTRY_DEPTH, max_bytes=MAX_REGISTRY_ENTRY_BYTES)
    except ValueError as e:
        raise ConfigError(f"registry entry {shown} is not valid JSON ({e})", hint=hint) from e
    if not isinstance(entry, dict):
        raise ConfigError(f"registry entry {shown} is not a JSON object", hint=hint)
    return entry

