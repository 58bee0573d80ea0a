"""The chunked AEAD stream (FORMAT.md section 6) and a background SHA-256.

``StreamWriter`` encrypts plaintext fed in arbitrary pieces, holding at most
one chunk; ``decrypt_stream_to`` decrypts chunk by chunk into a few reused
buffers and hands each payload region on (``decrypt_stream`` is its in-memory
form, for tools and tests).  Both use ``encrypt_into``/``decrypt_into`` where the installed
``cryptography`` has them, so the hot loop allocates nothing per chunk.

SHA-256 of the payload runs in a helper thread: ``hashlib`` releases the GIL
while hashing, so on two cores it overlaps the AEAD (which holds the GIL).  The
hash is still the slower of the two (about 1.7 vs 4.6 GB/s here), so it sets
the end-to-end rate; FORMAT.md section 10 has the measurements.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Callable
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from ..errors import BundleAuthError, BundleFormatError
from .format import MAX_TRAILER_LEN, TAG_SIZE

__all__ = ["StreamWriter", "decrypt_stream", "decrypt_stream_to", "BackgroundSha256", "chunk_nonce", "plaintext_length", "RING"]

Progress = Callable[[int], None]
_HAS_INTO = hasattr(ChaCha20Poly1305, "encrypt_into")
RING = 3
"""Chunk buffers in flight between the AEAD (main thread) and the SHA-256 thread."""


def chunk_nonce(index: int, final: bool) -> bytes:
    """``u88be(index) || flag`` (FORMAT.md 6)."""
    return index.to_bytes(11, "big") + (b"\x01" if final else b"\x00")


class BackgroundSha256:
    """SHA-256 of buffers fed in order, computed in a helper thread.

    A fed buffer must stay unchanged until it has been hashed: :meth:`feed`
    returns a ticket, and :meth:`wait` blocks until that buffer is done, so a
    small ring of buffers can be reused (:func:`decrypt_stream_to`).
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._done = threading.Condition()
        self._fed = 0
        self._hashed = 0
        self._thread = threading.Thread(target=self._run, name="sha256", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (view := self._queue.get()) is not None:
            self._hash.update(view)
            with self._done:
                self._hashed += 1
                self._done.notify_all()

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Queue ``data`` for hashing; returns the ticket to :meth:`wait` on before changing it."""
        if len(data):
            self._fed += 1
            self._queue.put(memoryview(data))
        return self._fed

    def wait(self, ticket: int) -> None:
        """Block until the buffer fed with ``ticket`` (and every one before it) has been hashed."""
        with self._done:
            self._done.wait_for(lambda: self._hashed >= ticket)

    def hexdigest(self) -> str:
        """Wait for everything fed so far and return the digest (once)."""
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()

    def abandon(self) -> None:
        """Stop the thread without a digest (error paths)."""
        self._queue.put(None)
        self._thread.join()


class StreamWriter:
    """Encrypt a plaintext stream chunk by chunk into ``out``.

    A full chunk is held back until more data arrives, because only then is it
    known not to be the final one.
    """

    def __init__(self, key: bytes, chunk_size: int, out: BinaryIO, progress: Progress | None = None) -> None:
        self._aead = ChaCha20Poly1305(key)
        self._size = chunk_size
        self._out = out
        self._progress = progress
        self._buf = bytearray(chunk_size)
        self._fill = 0
        self._sealed = bytearray(chunk_size + TAG_SIZE)
        self._index = 0
        self._finished = False

    def _emit(self, chunk: memoryview, final: bool) -> None:
        nonce = chunk_nonce(self._index, final)
        if _HAS_INTO:
            n = self._aead.encrypt_into(nonce, chunk, None, memoryview(self._sealed)[: len(chunk) + TAG_SIZE])
            self._out.write(memoryview(self._sealed)[:n])
        else:  # pragma: no cover - older cryptography
            self._out.write(self._aead.encrypt(nonce, bytes(chunk), None))
        self._index += 1
        if self._progress is not None:
            self._progress(len(chunk))

    def write(self, data: bytes | bytearray | memoryview, *, more: bool = False) -> None:
        """Encrypt ``data`` as the stream's next bytes.

        ``more=True`` promises that more data will follow (a payload before its
        trailer): a whole chunk at the end of ``data`` is then known not to be
        final and is encrypted straight from ``data`` instead of being copied
        into the held-back buffer.
        """
        view = memoryview(data).cast("B")
        pos, end, size = 0, len(view), self._size
        while pos < end:
            if self._fill == size:  # more data follows, so the held chunk is not final
                self._emit(memoryview(self._buf), final=False)
                self._fill = 0
            if self._fill == 0 and (end - pos > size or (more and end - pos == size)):  # zero-copy fast path
                self._emit(view[pos : pos + size], final=False)
                pos += size
                continue
            take = min(size - self._fill, end - pos)
            self._buf[self._fill : self._fill + take] = view[pos : pos + take]
            self._fill += take
            pos += take

    def finish(self) -> None:
        """Encrypt the held data as the final chunk.  The stream must not be empty."""
        if self._finished or self._fill == 0:
            raise ValueError("finish() needs a non-empty, unfinished stream")
        self._emit(memoryview(self._buf)[: self._fill], final=True)
        self._finished = True


def plaintext_length(ciphertext_length: int, chunk_size: int) -> int:
    """Plaintext bytes in a stream of ``ciphertext_length`` bytes, or -1 if no valid stream has that length."""
    full, rest = divmod(ciphertext_length, chunk_size + TAG_SIZE)
    if rest == 0:
        return full * chunk_size if full else -1
    return full * chunk_size + rest - TAG_SIZE if rest > TAG_SIZE else -1


def _truncated(detail: str) -> BundleAuthError:
    return BundleAuthError(f"encrypted stream {detail}: the bundle was truncated or modified")


def decrypt_stream(
    src: BinaryIO,
    ciphertext_length: int,
    key: bytes,
    chunk_size: int,
    payload: memoryview,
    on_payload: Callable[[memoryview], None] | None = None,
    progress: Progress | None = None,
) -> bytearray:
    """Decrypt a whole stream: the first ``len(payload)`` plaintext bytes into ``payload``, the rest returned.

    The in-memory form of :func:`decrypt_stream_to` (same checks, same errors), for tools and tests that hold a
    whole payload.  ``on_payload`` is called with each newly decrypted region of ``payload``, in order.  Nothing
    is trusted until the caller has also checked the signature and the digest.

    Raises:
        BundleAuthError: a chunk fails authentication, or the stream is too short.
        BundleFormatError: the stream is longer than the payload and the largest trailer.
    """
    written = 0

    def into_payload(region: memoryview) -> None:
        nonlocal written
        target = payload[written : written + len(region)]
        target[:] = region
        written += len(region)
        if on_payload is not None:
            on_payload(target)

    trailer, _ = decrypt_stream_to(src, ciphertext_length, key, chunk_size, len(payload), into_payload, progress)
    return trailer


def decrypt_stream_to(
    src: BinaryIO,
    ciphertext_length: int,
    key: bytes,
    chunk_size: int,
    payload_size: int,
    consume: Callable[[memoryview], None],
    progress: Progress | None = None,
) -> tuple[bytearray, str]:
    """Decrypt a whole stream chunk by chunk; pass the payload on, keep the trailer.

    ``consume`` is called with each decrypted payload region, in order, and must
    not keep the view (it is a reused buffer).  Returns the trailer (everything
    after the payload) and the payload's SHA-256 (hex), computed beside the AEAD
    in a helper thread.  Nothing is trusted until the caller has also checked the
    signature and the digest.

    Memory: one sealed chunk, :data:`RING` plaintext chunks and the trailer (at
    most ``MAX_TRAILER_LEN`` bytes, checked before it is allocated).

    Raises:
        BundleAuthError: a chunk fails authentication, or the stream is too short.
        BundleFormatError: the stream is longer than the payload and the largest trailer.
    """
    total = plaintext_length(ciphertext_length, chunk_size)
    if total < payload_size + 1:
        raise _truncated("is too short for its declared payload")
    if total - payload_size > MAX_TRAILER_LEN:
        raise BundleFormatError(f"encrypted stream holds {total - payload_size} bytes after the payload, "
                                f"more than the largest manifest and signature ({MAX_TRAILER_LEN})")
    aead = ChaCha20Poly1305(key)
    trailer = bytearray(total - payload_size)
    sealed = bytearray(chunk_size + TAG_SIZE)
    ring = [bytearray(chunk_size) for _ in range(min(RING, -(-total // chunk_size)))]
    tickets = [0] * len(ring)
    hasher = BackgroundSha256()
    try:
        n_chunks = -(-total // chunk_size)
        for index in range(n_chunks):
            start = index * chunk_size
            length = min(chunk_size, total - start)
            ct = memoryview(sealed)[: length + TAG_SIZE]
            if src.readinto(ct) != len(ct):
                raise _truncated("ended early")
            slot = index % len(ring)
            hasher.wait(tickets[slot])  # the hash thread is done with this buffer
            plain = memoryview(ring[slot])[:length]
            try:
                nonce = chunk_nonce(index, index == n_chunks - 1)
                if _HAS_INTO:
                    aead.decrypt_into(nonce, ct, None, plain)
                else:  # pragma: no cover - older cryptography
                    plain[:] = aead.decrypt(nonce, bytes(ct), None)
            except InvalidTag as e:
                raise _truncated(f"chunk {index} of {n_chunks} failed authentication") from e
            split = max(0, min(length, payload_size - start))
            if split:
                tickets[slot] = hasher.feed(plain[:split])
                consume(plain[:split])
            if split < length:
                at = start + split - payload_size
                trailer[at : at + length - split] = plain[split:]
            if progress is not None:
                progress(length)
    except BaseException:
        hasher.abandon()
        raise
    return trailer, hasher.hexdigest()
