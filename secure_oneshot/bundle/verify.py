"""Open and verify a bundle as a recipient: FORMAT.md section 7, steps numbered to match.

Nothing is released before every step has passed.  The payload is decrypted
chunk by chunk into a file that nobody else can name or read, checked as it
streams past (hash, strict safetensors rules, NaN/Inf), and only then released:

* ``open_bundle(..., out=PATH)``: a 0600 temporary file beside ``PATH``,
  renamed to ``PATH`` after the last check; on any failure it is removed.
* ``open_bundle(...)`` without ``out``: an anonymous temporary file (unlinked
  from the start, so it disappears with the process whatever happens), in
  :attr:`VerifyOptions.scratch_dir` or the system's temporary folder.
* ``verify_bundle(...)``: nowhere; the payload is checked and discarded.

The tensors returned are NumPy views of a copy-on-write memory map of that
verified file (writes stay in this process, never reach the file); the map (and the anonymous file behind it) lives as long as any returned
array or the :class:`OpenedBundle` does.  Pages are read from the file when a
tensor is used, so a process that opens a bundle holds in memory only what it
touches.

Memory bound: (1 + ``stream.RING``) x ``chunk_size`` (one sealed chunk, the
plaintext ring) + the trailer (at most 1 MiB + 68 bytes) + the safetensors
header (at most ``PayloadLimits.max_header_bytes``) + a constant for the header
and the interpreter; not the payload.  Nothing is allocated or written from a
size the file states before that size has been checked against the format's
maxima (``payload_size`` <= 64 GiB, ``chunk_size`` <= 16 MiB), against
:attr:`VerifyOptions.max_payload_bytes` and against the file's real length, so
a header claiming a huge payload, or a sparse terabyte file, is refused
without reading it.  ``benchmarks/transfer.py --cli`` measures the whole
process.
"""

from __future__ import annotations

import contextlib
import hmac
import mmap
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .._internal.atomic import atomic_writer
from .._internal.encoding import format_time, parse_time, utc_now
from ..errors import BundleAuthError, BundleFormatError, FreshnessError, ResourceError
from ..keys.identity import Identity, PublicIdentity
from ..keys.trust import TrustStore
from .format import MAX_MANIFEST_LEN, SIGNATURE_SIZE, Header, Manifest, header_mac, signed_message, stream_key
from .inspect import RawHeader, _open_file, read_header
from .recipients import unwrap_file_key
from .payload_scan import PayloadScanner
from .safetensors_strict import Layout, PayloadLimits, TensorPayload, parse_payload
from .stream import Progress, decrypt_stream_to

if TYPE_CHECKING:   # callers hand a ledger in; opening one (SQLite) is theirs to pay for
    from .ledger import ReplayLedger

__all__ = ["OpenedBundle", "VerifiedBundle", "VerifyOptions", "open_bundle", "verify_bundle", "check_freshness", "DEFAULT_MAX_PAYLOAD_BYTES"]

DEFAULT_SKEW = timedelta(seconds=300)
DEFAULT_MAX_PAYLOAD_BYTES = 2 << 30
"""Default reader limit on ``payload_size`` (2 GiB).  The ingest policy's ``max_bundle_bytes``
has no built-in default, and the example policy's 500 MB would refuse bundles another
policy allows.  Raise it with ``VerifyOptions(max_payload_bytes=...)`` or ``--max-bytes``."""


@dataclass(frozen=True)
class VerifyOptions:
    """Reader-side limits and clocks.

    Attributes:
        max_payload_bytes: refuse larger payloads before decrypting or allocating
            (default :data:`DEFAULT_MAX_PAYLOAD_BYTES`; ``None``: only the format's 64 GiB maximum).
        skew: how far in the future ``created`` may be.
        limits: strict safetensors rules.
        scratch_dir: where ``open_bundle`` without ``out`` keeps the anonymous decrypted
            file (default: the system's temporary folder).
    """

    max_payload_bytes: int | None = DEFAULT_MAX_PAYLOAD_BYTES
    skew: timedelta = DEFAULT_SKEW
    limits: PayloadLimits = PayloadLimits()
    scratch_dir: str | os.PathLike[str] | None = None


@dataclass
class OpenedBundle:
    """A fully verified bundle.

    ``payload_bytes`` and the tensors are views of a copy-on-write memory map of
    the verified payload file; they stay valid while any of them is referenced.
    Writing to a tensor changes this process's copy only, never the file.
    """

    header: Header
    manifest: Manifest
    sender: PublicIdentity
    payload: TensorPayload
    payload_bytes: memoryview

    @property
    def tensors(self) -> dict[str, Any]:
        """The verified tensors: NumPy arrays that are views of the payload (``bundle.arrays.to_torch`` for PyTorch)."""
        return self.payload.tensors

    def record_in(self, ledger: ReplayLedger, now: datetime | None = None) -> None:
        """Record this bundle as accepted (FORMAT.md 7 step 13).  Raises ``ReplayError`` if it already was."""
        h = self.header
        ledger.record(h.bundle_id, h.sender, h.created, self.manifest.payload_sha256, now)

    def save_payload(self, path: str | os.PathLike[str]) -> Path:
        """Write the verified safetensors payload atomically with mode 0600 (``open_bundle(out=...)`` does it in one pass)."""
        with atomic_writer(path, mode=0o600) as f:
            f.write(self.payload_bytes)  # no copy of the payload
        return Path(path)


def _payload_buffer(size: int, options: VerifyOptions, out: str | os.PathLike[str] | None) -> contextlib.AbstractContextManager[BinaryIO]:
    """The file the ``size``-byte payload is decrypted into, opened only after ``size`` has passed every limit:
    a 0600 temporary beside ``out``, renamed to ``out`` only if the block succeeds; or, without ``out``,
    an anonymous 0600 file that no name reaches and that disappears when closed."""
    if out is not None:
        return atomic_writer(out, mode=0o600, readable=True)
    try:
        return tempfile.TemporaryFile(dir=options.scratch_dir)
    except OSError as e:
        raise ResourceError(f"cannot create a temporary file for the payload: {e.strerror or e}",
                            hint="set TMPDIR (or VerifyOptions.scratch_dir) to a writable folder") from e


def _map_verified(f: BinaryIO, size: int) -> memoryview:
    """A copy-on-write map of the verified payload file (which must not be empty): arrays over it are
    writable as before, a write copies that page for this process and never reaches the file."""
    f.flush()
    return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY))


def check_freshness(header: Header, now: datetime, skew: timedelta = DEFAULT_SKEW) -> None:
    """FORMAT.md 7 step 3.  Raises :class:`FreshnessError`."""
    if now >= parse_time(header.expires):
        raise FreshnessError(f"bundle {header.bundle_id} expired at {header.expires} (now {format_time(now)})")
    if parse_time(header.created) > now + skew:
        raise FreshnessError(
            f"bundle {header.bundle_id} is dated {header.created}, more than {int(skew.total_seconds())} s in the future",
            hint="check the clocks of the sending site and this machine",
        )


def _split_trailer(trailer: bytearray) -> tuple[bytes, bytes]:
    """FORMAT.md 7 step 9: ``u32be(len) || manifest || signature`` and nothing else."""
    if len(trailer) < 4 + 1 + SIGNATURE_SIZE:
        raise BundleAuthError("the signed manifest is missing: the bundle was truncated or modified")
    length = int.from_bytes(trailer[:4], "big")
    if not 1 <= length <= MAX_MANIFEST_LEN or len(trailer) != 4 + length + SIGNATURE_SIZE:
        raise BundleFormatError("the manifest section has an inconsistent length")
    return bytes(trailer[4 : 4 + length]), bytes(trailer[4 + length :])


def _check_manifest(body: bytes, signature: bytes, sender: PublicIdentity, header: Header, digest: str) -> Manifest:
    """Steps 10-11: signature, then manifest fields against the header, then the digest."""
    if not sender.verify(signed_message(body), signature):
        raise BundleAuthError(f"the manifest signature does not verify with {sender.name}'s key ({sender.key_id})")
    manifest = Manifest.from_bytes(body)
    differing = manifest.disagreements(header)
    if "recipients" in differing:
        raise BundleAuthError(
            "the signed recipient list differs from the bundle's recipients: this payload was re-encrypted "
            "(forwarded) by someone other than the sender",
            hint="accept bundles only directly from the signing site",
        )
    if differing:
        raise BundleAuthError(f"the signed manifest disagrees with the header on {', '.join(differing)}")
    if not hmac.compare_digest(manifest.payload_sha256, digest):
        raise BundleAuthError("the payload's SHA-256 differs from the signed digest")
    return manifest


def open_bundle(
    path: str | os.PathLike[str],
    identity: Identity,
    trust: TrustStore,
    *,
    ledger: ReplayLedger | None = None,
    now: datetime | None = None,
    options: VerifyOptions = VerifyOptions(),
    progress: Progress | None = None,
    out: str | os.PathLike[str] | None = None,
) -> OpenedBundle:
    """Verify and decrypt the bundle at ``path`` for recipient ``identity``.

    Args:
        path: the bundle file.
        identity: the recipient's private identity.
        trust: trust store; the sender must be trusted as ``sender``.
        ledger: when given, refuse replays and record this bundle as accepted.
        now: verification time (default: the clock).
        options: limits and clock skew.
        progress: called with plaintext bytes after each chunk.
        out: also publish the verified safetensors payload at this path (mode 0600,
            atomically, only after every check has passed).

    Returns:
        The verified header, manifest, sender and tensors (views of a copy-on-write
        map of the verified payload).

    Raises:
        BundleFormatError, FreshnessError, TrustError, ReplayError,
        NotARecipientError, BundleAuthError, TensorPayloadError.
    """
    now = now or utc_now()
    with _open_file(path) as src:
        raw, sender, key = _steps_before_stream(src, identity, trust, ledger, now, options)
        header = raw.header
        with _payload_buffer(header.payload_size, options, out) as sink:
            manifest, _ = _decrypt_checked(src, raw.stream_length, key, header, sender, options, sink, progress)
            view = _map_verified(sink, header.payload_size)
            tensors = parse_payload(view, options.limits, values_checked=True)  # before ``out`` is published
    opened = OpenedBundle(header, manifest, sender, tensors, view)
    if ledger is not None:
        opened.record_in(ledger, now)  # step 13
    return opened


@dataclass(frozen=True)
class VerifiedBundle:
    """A fully verified bundle whose payload was checked and discarded (:func:`verify_bundle`)."""

    header: Header
    manifest: Manifest
    sender: PublicIdentity
    tensor_specs: dict[str, tuple[str, tuple[int, ...]]]
    """name -> (safetensors dtype code, shape), sorted by name."""


def verify_bundle(
    path: str | os.PathLike[str],
    identity: Identity,
    trust: TrustStore,
    *,
    ledger: ReplayLedger | None = None,
    now: datetime | None = None,
    options: VerifyOptions = VerifyOptions(),
    progress: Progress | None = None,
) -> VerifiedBundle:
    """Every check of :func:`open_bundle`, holding and writing no payload: for ``secure-oneshot verify``.

    The ledger, when given, is only checked (step 5), never written.  Raises what :func:`open_bundle` raises.
    """
    now = now or utc_now()
    with _open_file(path) as src:
        raw, sender, key = _steps_before_stream(src, identity, trust, ledger, now, options)
        manifest, layout = _decrypt_checked(src, raw.stream_length, key, raw.header, sender, options, None, progress)
    specs = {e.name: (e.dtype, e.shape) for e in sorted(layout.entries, key=lambda e: e.name)}
    return VerifiedBundle(raw.header, manifest, sender, specs)


def _steps_before_stream(src: BinaryIO, identity: Identity, trust: TrustStore, ledger: ReplayLedger | None,
                         now: datetime, options: VerifyOptions) -> tuple[RawHeader, PublicIdentity, bytes]:
    """Steps 1-7; returns the header, the trusted sender and the stream key."""
    # Steps 1-2; sizes checked against the limit and the file's length before anything is allocated.
    raw = read_header(src, max_payload_bytes=options.max_payload_bytes)
    header = raw.header
    check_freshness(header, now, options.skew)  # step 3
    sender = trust.require(header.sender, "sender", now)  # step 4
    if ledger is not None:
        ledger.check(header.bundle_id)  # step 5
    file_key = unwrap_file_key(header, identity)  # step 6
    if not hmac.compare_digest(raw.mac, header_mac(file_key, raw.header_bytes)):  # step 7
        raise BundleAuthError("the header MAC does not verify: the public header was modified")
    return raw, sender, stream_key(file_key, raw.header_bytes)


def _decrypt_checked(src: BinaryIO, stream_length: int, key: bytes, header: Header, sender: PublicIdentity,
                     options: VerifyOptions, sink: BinaryIO | None, progress: Progress | None) -> tuple[Manifest, Layout]:
    """Steps 8-12: decrypt into ``sink`` (None: discard), checking the payload as it passes."""
    # with a sink the payload becomes NumPy arrays (open_bundle): NumPy's checks then cost no import
    scanner = PayloadScanner(header.payload_size, options.limits, numpy=True if sink is not None else None)

    def consume(piece: memoryview) -> None:
        if sink is not None:
            try:
                sink.write(piece)
            except OSError as e:
                raise ResourceError(f"cannot write the decrypted payload: {e.strerror or e}", hint="check free disk space") from e
        scanner.feed(piece)

    trailer, digest = decrypt_stream_to(src, stream_length, key, header.chunk_size, header.payload_size, consume, progress)  # step 8
    body, signature = _split_trailer(trailer)  # step 9
    manifest = _check_manifest(body, signature, sender, header, digest)  # steps 10-11
    return manifest, scanner.finish()  # step 12: values checked as they streamed past, then the layout
