"""Seal tensors into a bundle: stream, hash, encrypt and sign in one pass (FORMAT.md 4-6).

The payload is never materialised.  From tensors: the safetensors header and
zero-copy views of the tensors are hashed by a helper thread while the main
thread encrypts them chunk by chunk.  From a safetensors file: the file is read
a window at a time into a small ring of reused buffers, and each window is
checked (strict safetensors rules, NaN/Inf), hashed and encrypted from that one
buffer, so all three see the same bytes and memory stays a few windows whatever
the file size.  The bundle goes to a temporary file that is renamed into place
only when complete; the manifest (with the digest) is signed and appended last.
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
from .payload_scan import PayloadScanner
from .safetensors_strict import PayloadLimits, header_length, read_layout, serialize_tensors
from .stream import RING, BackgroundSha256, Progress, StreamWriter

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


PayloadWriter = Callable[[StreamWriter, BackgroundSha256], None]
"""Writes the payload into the stream and feeds the same bytes to the hash, in order."""

READ_WINDOW = 4 << 20
"""Bytes read from a source file per step (rounded to whole chunks).  Every chunk is encrypted
straight from the window it was read into (the trailer always follows the payload, so no payload
chunk is held back as a possible final one)."""


def _write_bundle(f: BinaryIO, header_bytes: bytes, file_key: bytes, chunk_size: int, write_payload: PayloadWriter,
                  make_trailer: Callable[[str], bytes], progress: Progress | None) -> None:
    f.write(header_bytes)
    f.write(header_mac(file_key, header_bytes))
    hasher = BackgroundSha256()
    try:
        writer = StreamWriter(stream_key(file_key, header_bytes), chunk_size, f, progress)
        write_payload(writer, hasher)
    except BaseException:
        hasher.abandon()
        raise
    writer.write(make_trailer(hasher.hexdigest()))
    writer.finish()


def _segment_writer(segments: Sequence[memoryview]) -> PayloadWriter:
    def write(writer: StreamWriter, hasher: BackgroundSha256) -> None:
        for segment in segments:  # views of the tensors themselves: nothing is reused, so hash them all at once
            hasher.feed(segment)
        for segment in segments:
            writer.write(segment, more=True)  # the signed trailer follows the payload

    return write


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
    _write_bundle(f, header_bytes, file_key, chunk_size, _segment_writer(segments), make_trailer, progress)


def _file_writer(src: BinaryIO, size: int, limits: PayloadLimits, window: int, name: str) -> PayloadWriter:
    """Read ``size`` bytes of ``src`` a window at a time; check, hash and encrypt each window from one buffer."""

    def write(writer: StreamWriter, hasher: BackgroundSha256) -> None:
        scanner = PayloadScanner(size, limits)
        ring = [bytearray(min(window, size)) for _ in range(min(RING, -(-size // window)))]
        tickets = [0] * len(ring)
        position = 0
        while position < size:
            slot = (position // window) % len(ring)
            hasher.wait(tickets[slot])  # the hash thread is done with this buffer's previous window
            view = memoryview(ring[slot])[: min(window, size - position)]
            if src.readinto(view) != len(view):
                raise TensorPayloadError(f"{name} changed while it was being read")
            scanner.feed(view)
            scanner.raise_if_failed()  # refuse to send what a receiver must refuse
            tickets[slot] = hasher.feed(view)
            writer.write(view, more=True)  # the signed trailer follows the payload: no payload chunk is final
            position += len(view)
        scanner.finish()
        if src.read(1):
            raise TensorPayloadError(f"{name} grew while it was being read")

    return write


def _signed_trailer(sender: Identity, manifest_for: Callable[[str], Manifest], sink: list[Manifest]) -> Callable[[str], bytes]:
    def make(digest: str) -> bytes:
        manifest = manifest_for(digest)
        sink.append(manifest)
        body = manifest.to_bytes()
        return len(body).to_bytes(4, "big") + body + sender.sign(signed_message(body))

    return make


def _seal_segments(segments: Sequence[memoryview], *args: Any, **kwargs: Any) -> SealResult:
    return _seal(sum(len(s) for s in segments), _segment_writer(segments), *args, **kwargs)


def _seal(
    payload_size: int,
    write_payload: PayloadWriter,
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
        payload_size=payload_size,
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
        _write_bundle(f, header_bytes, file_key, chunk_size, write_payload, _signed_trailer(sender, manifest_for, manifests), progress)
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
    The file is read once, a window at a time (:data:`READ_WINDOW`): memory stays
    a few windows whatever its size.

    Raises:
        TensorPayloadError: the file breaks the strict safetensors rules.
    """
    name = os.fspath(source)
    try:
        src = open(source, "rb", buffering=0)
    except OSError as e:
        raise ResourceError(f"cannot read {source}: {e.strerror}", hint="check the path of the safetensors file") from e
    with src:
        try:
            size = os.fstat(src.fileno()).st_size
            if not size:
                raise TensorPayloadError(f"{source} is empty, not a safetensors file")
            # The header and layout first, before any output exists; the values are checked as they stream.
            prefix = src.read(8)
            prefix += src.read(header_length(prefix, size, limits))
            read_layout(prefix, size, limits)
            src.seek(0)
        except OSError as e:
            raise ResourceError(f"cannot read {source}: {e.strerror}", hint="check the path of the safetensors file") from e
        window = max(chunk_size, READ_WINDOW // chunk_size * chunk_size)
        return _seal(
            size, _file_writer(src, size, limits, window, name), out, sender, recipients,
            _Statement(policy_id, policy_sha256, dp, meta),
            valid_for=valid_for, now=now, chunk_size=chunk_size, progress=progress, unsafe_rng=None,
        )
