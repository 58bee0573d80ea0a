"""Measure the candidate stream AEADs on this machine (single core, 64 KiB chunks).

Prints MB/s for AES-256-GCM and ChaCha20-Poly1305 (``cryptography``), pynacl's
secretstream (XChaCha20-Poly1305), and SHA-256 / BLAKE2b for the payload digest,
plus whether each call releases the GIL (two threads vs one).  FORMAT.md quotes
the numbers this printed when the v1 cipher was chosen.

    python benchmarks/aead_choice.py [--mib 256] [--chunk 65536]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from nacl.bindings import (
    crypto_secretstream_xchacha20poly1305_init_push,
    crypto_secretstream_xchacha20poly1305_keygen,
    crypto_secretstream_xchacha20poly1305_push,
    crypto_secretstream_xchacha20poly1305_state,
)


def _nonce(i: int) -> bytes:
    return i.to_bytes(11, "big") + b"\x00"


def _cryptography_loop(cipher: AESGCM | ChaCha20Poly1305) -> Callable[[list[bytes]], None]:
    def run(chunks: list[bytes]) -> None:
        for i, chunk in enumerate(chunks):
            cipher.encrypt(_nonce(i), chunk, None)

    return run


def _secretstream_loop(chunks: list[bytes]) -> None:
    state = crypto_secretstream_xchacha20poly1305_state()
    crypto_secretstream_xchacha20poly1305_init_push(state, crypto_secretstream_xchacha20poly1305_keygen())
    for chunk in chunks:
        crypto_secretstream_xchacha20poly1305_push(state, chunk)


def _hash_loop(name: str) -> Callable[[list[bytes]], None]:
    def run(chunks: list[bytes]) -> None:
        h = hashlib.new(name)
        for chunk in chunks:
            h.update(chunk)
        h.digest()

    return run


def _rate(fn: Callable[[list[bytes]], None], chunks: list[bytes], threads: int = 1) -> float:
    """MB/s of ``fn`` over ``chunks`` (each of ``threads`` threads does the whole list)."""
    workers = [threading.Thread(target=fn, args=(chunks,)) for _ in range(threads)]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - start
    return threads * sum(map(len, chunks)) / elapsed / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=65536)
    args = parser.parse_args()
    chunks = [os.urandom(args.chunk) for _ in range(args.mib * 2**20 // args.chunk)]
    candidates = {
        "aes-256-gcm": _cryptography_loop(AESGCM(os.urandom(32))),
        "chacha20-poly1305": _cryptography_loop(ChaCha20Poly1305(os.urandom(32))),
        "secretstream-xchacha20poly1305": _secretstream_loop,
        "sha256": _hash_loop("sha256"),
        "blake2b": _hash_loop("blake2b"),
    }
    print(f"{'primitive':32s} {'1 thread MB/s':>14s} {'2 threads MB/s':>15s}")
    for name, fn in candidates.items():
        _rate(fn, chunks[:64])  # warm up
        print(f"{name:32s} {_rate(fn, chunks):14.0f} {_rate(fn, chunks, threads=2):15.0f}")


if __name__ == "__main__":
    main()
