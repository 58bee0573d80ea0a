"""Seal tensors into a bundle: stream, hash, encrypt and sign in one pass (FORMAT.md 4-6).

The payload is never materialised: the safetensors header and zero-copy views of
the tensors are hashed by a helper thread while the main thread encrypts them
chunk by chunk into a temporary file, which is renamed into place only when
complete.  The manifest (with the digest) is signed and appended last.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, BinaryIO

from .._internal.atomic import atomic_writer
from .._internal.encoding import format_time, utc_now
from ..errors import ResourceError, TensorPayloadError
from ..keys.identity import Identity, PublicIdentity
from .format import DEFAULT_CHUNK_SIZE, MAGIC, Header, Manifest, header_mac, signed_message, stream_key
from .recipients import check_recipients, wrap_file_key
from .safetensors_strict import PayloadLimits, parse_payload, serialize_tensors
from .stream import BackgroundSha256, Progress, StreamWriter

__all__ = ["SealResult", "seal_tensors", "seal_safetensors_file", "UnsafeDeterministicRandomWarning"]

Rng = Callable[[int], bytes]


class UnsafeDeterministicRandomWarning(UserWarning):
    """A bundle was sealed with caller-supplied randomness (test vectors only)."""


@dataclass(frozen=True)
class SealResult:
    """What was written: the path, the public header and the signed manifest."""

    path: Path
    header: Header
    manifest: Manifest


@dataclass(frozen=True)
class _Statement:
    """The sender's statements that go into header and manifest besides the payload."""

    policy_id: str = ""
    policy_sha256: str = ""
    dp: Mapping[str, Any] | None = None
    meta: Mapping[str, Any] | None = None


def write_stream(
    f: BinaryIO,
    header_bytes: bytes,
    file_key: bytes,
    chunk_size: int,
    segments: Sequence[memoryview],
    make_trailer: Callable[[str], bytes],
    progress: Progress | None = None,
) -> None:
    """Write header MAC and stream: ``segments`` (the payload) then ``make_trailer(payload_sha256)``."""
    f.write(header_bytes)
    f.write(header_mac(file_key, header_bytes))
    hasher = BackgroundSha256()
    try:
        for segment in segments:
            hasher.feed(segment)
        writer = StreamWriter(stream_key(file_key, header_bytes), chunk_size, f, progress)
        for segment in segments:
            writer.write(segment)
    except BaseException:
        hasher.abandon()
        raise
    writer.write(make_trailer(hasher.hexdigest()))
    writer.finish()


def _signed_trailer(sender: Identity, manifest_for: Callable[[str], Manifest], sink: list[Manifest]) -> Callable[[str], bytes]:
    def make(digest: str) -> bytes:
        manifest = manifest_for(digest)
        sink.append(manifest)
        body = manifest.to_bytes()
        return len(body).to_bytes(4, "big") + body + sender.sign(signed_message(body))

    return make


def _seal_segments(
    segments: Sequence[memoryview],
    out: str | os.PathLike[str],
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    statement: _Statement,
    *,
    valid_for: timedelta,
    now: datetime | None,
    chunk_size: int,
    progress: Progress | None,
    unsafe_rng: Rng | None,
) -> SealResult:
    recipients = check_recipients(recipients)
    if valid_for < timedelta(seconds=1):
        raise ValueError("valid_for must be at least one second")
    if unsafe_rng is not None:
        warnings.warn("sealing with deterministic randomness: test vectors only", UnsafeDeterministicRandomWarning, stacklevel=3)
    rng = unsafe_rng or os.urandom
    created = (now or utc_now()).replace(microsecond=0)
    file_key = rng(32)
    header = Header(
        bundle_id=rng(16).hex(),
        sender=sender.key_id,
        recipients=tuple(wrap_file_key(file_key, r, rng(32) if unsafe_rng else None) for r in recipients),
        created=format_time(created),
        expires=format_time(created + valid_for),
        policy_id=statement.policy_id,
        payload_size=sum(len(s) for s in segments),
        chunk_size=chunk_size,
    )
    header_bytes = header.to_bytes()
    # Apply the reader's own checks, so we never write a bundle a reader must refuse.
    Header.from_json_bytes(header_bytes[len(MAGIC) + 4 :])

    def manifest_for(digest: str) -> Manifest:
        return Manifest(
            header.bundle_id, header.sender, header.recipient_ids, header.created, header.expires, header.policy_id,
            header.payload_size, digest, statement.policy_sha256, dict(statement.dp or {}), dict(statement.meta or {}),
        )

    manifests: list[Manifest] = []
    with atomic_writer(out, mode=0o644) as f:
        write_stream(f, header_bytes, file_key, chunk_size, segments, _signed_trailer(sender, manifest_for, manifests), progress)
    return SealResult(Path(out), header, manifests[0])


def seal_tensors(
    tensors: Mapping[str, Any],
    out: str | os.PathLike[str],
    *,
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    metadata: Mapping[str, str] | None = None,
    policy_id: str = "",
    policy_sha256: str = "",
    dp: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    valid_for: timedelta = timedelta(days=7),
    now: datetime | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
    unsafe_rng: Rng | None = None,
) -> SealResult:
    """Seal ``tensors`` (as a safetensors payload) from ``sender`` to ``recipients`` into ``out``.

    Args:
        tensors: name -> NumPy array (``bundle.arrays``) or CPU / GPU torch tensor; sorted by name in the payload.
        out: bundle path, written atomically.
        sender: the site's private identity (signs the manifest).
        recipients: 1..16 public identities that can open it.
        metadata: safetensors ``__metadata__`` strings.
        policy_id, policy_sha256, dp, meta: statements bound into the signed manifest.
        valid_for: time until ``expires``.
        now: creation time (default: the clock).
        chunk_size: stream chunk size (power of two, 64 KiB..16 MiB).
        progress: called with the number of plaintext bytes after each chunk.
        unsafe_rng: deterministic randomness for test vectors; never in production.

    Returns:
        SealResult with the header and manifest written.

    Raises:
        KeyMaterialError: no recipient, too many, or the same key listed twice.
        ResourceError: the output cannot be written.

    >>> import numpy as np, tempfile
    >>> from secure_oneshot.keys import Identity
    >>> site, server = Identity.generate("site"), Identity.generate("server")
    >>> out = tempfile.mkdtemp() + "/w.sob"
    >>> seal_tensors({"w": np.ones(2, dtype=np.float32)}, out, sender=site, recipients=[server.public]).header.payload_size
    72
    """
    segments = serialize_tensors(tensors, metadata)
    statement = _Statement(policy_id, policy_sha256, dp, meta)
    return _seal_segments(
        segments, out, sender, recipients, statement,
        valid_for=valid_for, now=now, chunk_size=chunk_size, progress=progress, unsafe_rng=unsafe_rng,
    )


def seal_safetensors_file(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    sender: Identity,
    recipients: Sequence[PublicIdentity],
    limits: PayloadLimits = PayloadLimits(),
    policy_id: str = "",
    policy_sha256: str = "",
    dp: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    valid_for: timedelta = timedelta(days=7),
    now: datetime | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    progress: Progress | None = None,
) -> SealResult:
    """Seal an existing safetensors file byte for byte, after checking it with the strict parser.

    Arguments are those of :func:`seal_tensors`; ``limits`` are the strict-parsing limits.

    Raises:
        TensorPayloadError: the file breaks the strict safetensors rules.
    """
    # Read once into one buffer: the payload is "the tensors themselves", so this
    # stays within the memory bound, and the strict check and the sealing see the
    # very same bytes (no re-read of a file that could change in between).
    try:
        with open(source, "rb") as f:
            payload = bytearray(os.fstat(f.fileno()).st_size)
            if f.readinto(payload) != len(payload):
                raise TensorPayloadError(f"{source} changed while it was being read")
    except OSError as e:
        raise ResourceError(f"cannot read {source}: {e.strerror}", hint="check the path of the safetensors file") from e
    if not payload:
        raise TensorPayloadError(f"{source} is empty, not a safetensors file")
    parse_payload(payload, limits)  # refuse to send what a receiver must refuse
    return _seal_segments(
        [memoryview(payload)], out, sender, recipients, _Statement(policy_id, policy_sha256, dp, meta),
        valid_for=valid_for, now=now, chunk_size=chunk_size, progress=progress, unsafe_rng=None,
    )
