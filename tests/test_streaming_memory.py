"""Seal, open and verify in one streaming pass: memory bounded by chunks, nothing released or left behind on failure.

The memory test runs seal and open of a ~200 MB payload in a fresh interpreter
and reads its peak resident set from ``/proc/self/status`` (``VmHWM``: the peak of
that process image only, unlike ``ru_maxrss``, which on Linux carries the peak of
the process that called ``exec``).  It is a resource assertion, not a timing one.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from secure_oneshot.bundle import open_bundle, seal_safetensors_file, seal_tensors
from secure_oneshot.bundle.format import stream_key
from secure_oneshot.bundle.inspect import read_header
from secure_oneshot.bundle.payload_scan import PayloadScanner
from secure_oneshot.bundle.recipients import unwrap_file_key
from secure_oneshot.bundle.seal import write_stream
from secure_oneshot.bundle.stream import decrypt_stream
from secure_oneshot.errors import BundleAuthError, TensorPayloadError

from .conftest import NOW, SMALL_CHUNK
from .ingest_helpers import run_ingest, seal

MiB = 1 << 20
PAYLOAD_MIB = 200

CHILD = r"""
import json, os, struct, sys
from datetime import datetime, timezone
from pathlib import Path

def hwm():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

from secure_oneshot.bundle import open_bundle, seal_safetensors_file
from secure_oneshot.keys import Identity, TrustEntry, TrustStore
import numpy, cryptography.hazmat.primitives.ciphers.aead  # the libraries the work needs, loaded before the baseline

work = Path(sys.argv[1])
site, server = Identity.generate("site"), Identity.generate("server")
trust = TrustStore().with_entry(TrustEntry(site.public, frozenset({"sender"})))
now = datetime(2026, 11, 26, 12, tzinfo=timezone.utc)
base = hwm()
seal_safetensors_file(work / "in.safetensors", work / "b.sob", sender=site, recipients=[server.public], now=now)
after_seal = hwm()
opened = open_bundle(work / "b.sob", server, trust, now=now, out=work / "out.safetensors")
print(json.dumps({"base": base, "seal": after_seal, "open": hwm(), "shape": list(opened.tensors["w"].shape)}))
"""


def sparse_safetensors(path: Path, n_floats: int) -> Path:
    """A valid safetensors file of one F32 tensor of zeros, written sparse (no memory, no disk blocks)."""
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 4 * n_floats)
    return path


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc for the peak resident set")
def test_seal_and_open_of_200_mb_hold_chunks_not_the_payload(tmp_path: Path) -> None:
    source = sparse_safetensors(tmp_path / "in.safetensors", PAYLOAD_MIB * MiB // 4)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    peaks = json.loads(run.stdout)
    assert peaks["shape"] == [PAYLOAD_MIB * MiB // 4]
    # 1 MiB chunks: a few read windows and chunk buffers, far below the 200 MiB payload.
    assert peaks["seal"] - peaks["base"] < 48 * MiB, peaks
    assert peaks["open"] - peaks["base"] < 48 * MiB, peaks
    out = tmp_path / "out.safetensors"
    assert out.stat().st_mode & 0o777 == 0o600
    assert out.stat().st_size == source.stat().st_size
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(source.read_bytes()).digest()


# --- failures mid-stream leave nothing --------------------------------------------------------------


def _rewrite_trailer(parties, bundle: Path, out: Path, change) -> Path:
    """Re-encrypt ``bundle`` with the same header (valid MAC and stanza) and a changed trailer."""
    with open(bundle, "rb") as f:
        raw = read_header(f)
        file_key = unwrap_file_key(raw.header, parties.server)
        payload = bytearray(raw.header.payload_size)
        trailer = decrypt_stream(f, raw.stream_length, stream_key(file_key, raw.header_bytes), raw.header.chunk_size, memoryview(payload))
    with open(out, "wb") as f:
        write_stream(f, raw.header_bytes, file_key, raw.header.chunk_size, [memoryview(payload)], lambda digest: change(bytes(trailer)))
    return out


def _assert_nothing_published(folder: Path, expected: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == expected  # no output, no temporary


def test_tampered_last_chunk_publishes_nothing(parties, sealed: Path, tmp_path: Path) -> None:
    data = bytearray(sealed.read_bytes())
    data[-1] ^= 1
    bad = tmp_path / "bad.sob"
    bad.write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(BundleAuthError, match="failed authentication") as caught:
        open_bundle(bad, parties.server, parties.trust, now=NOW, out=dest / "w.safetensors")
    assert caught.value.exit_code == 6
    _assert_nothing_published(dest, set())


def test_bad_signature_publishes_nothing_and_keeps_the_old_file(parties, sealed: Path, tmp_path: Path) -> None:
    forged = _rewrite_trailer(parties, sealed, tmp_path / "forged.sob", lambda t: t[:-1] + bytes([t[-1] ^ 1]))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "w.safetensors").write_bytes(b"previous")
    with pytest.raises(BundleAuthError, match="signature does not verify"):
        open_bundle(forged, parties.server, parties.trust, now=NOW, out=dest / "w.safetensors")
    _assert_nothing_published(dest, {"w.safetensors"})
    assert (dest / "w.safetensors").read_bytes() == b"previous"


def test_payload_rule_broken_mid_stream_publishes_nothing(parties, tmp_path: Path) -> None:
    # A trusted sender's correctly signed bundle whose payload has a NaN well past the first chunk.
    values = np.zeros(3 * SMALL_CHUNK // 4, dtype=np.float32)
    values[-5] = np.nan
    bundle = seal_tensors({"w": values}, tmp_path / "nan.sob", sender=parties.site, recipients=[parties.server.public],
                          now=NOW, chunk_size=SMALL_CHUNK)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(TensorPayloadError, match="NaN or infinite") as caught:
        open_bundle(bundle.path, parties.server, parties.trust, now=NOW, out=dest / "w.safetensors")
    assert caught.value.exit_code == 13
    _assert_nothing_published(dest, set())


def test_payload_rule_is_reported_after_the_signature(parties, tmp_path: Path) -> None:
    """A NaN payload under a bad signature is an authentication failure: payload rules come last (step 12)."""
    values = np.full(100, np.inf, dtype=np.float32)
    bundle = seal_tensors({"w": values}, tmp_path / "inf.sob", sender=parties.site, recipients=[parties.server.public],
                          now=NOW, chunk_size=SMALL_CHUNK)
    forged = _rewrite_trailer(parties, bundle.path, tmp_path / "forged.sob", lambda t: t[:-1] + bytes([t[-1] ^ 1]))
    with pytest.raises(BundleAuthError):
        open_bundle(forged, parties.server, parties.trust, now=NOW)


def test_seal_refuses_a_nan_past_the_first_window_and_leaves_no_bundle(parties, tmp_path: Path) -> None:
    values = np.zeros(5 * MiB // 4, dtype=np.float32)  # 5 MiB: past the first 4 MiB read window
    values[-1] = np.inf
    source = tmp_path / "w.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [values.size], "data_offsets": [0, values.nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    source.write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
    with pytest.raises(TensorPayloadError, match="NaN or infinite"):
        seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], now=NOW)
    _assert_nothing_published(tmp_path, {"w.safetensors"})


def test_opened_file_is_0600_and_the_tensors_are_private_copies_on_write(parties, sealed: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.safetensors"
    opened = open_bundle(sealed, parties.server, parties.trust, now=NOW, out=out)
    assert out.stat().st_mode & 0o777 == 0o600
    before = out.read_bytes()
    assert bytes(opened.payload_bytes) == before
    opened.tensors["big"][0] = 7.0  # a write stays in this process
    assert out.read_bytes() == before
    anonymous = open_bundle(sealed, parties.server, parties.trust, now=NOW)
    assert bytes(anonymous.payload_bytes) == before


# --- the streaming checker itself ---------------------------------------------------------------------


def _payload(tensors: dict[str, np.ndarray], pad: int = 0) -> bytes:
    """A safetensors file whose header length is ``pad`` bytes off 8-byte alignment (legal, and unaligned data)."""
    header, offset, data = {}, 0, b""
    for name, value in tensors.items():
        code = {"float32": "F32", "float64": "F64", "float16": "F16", "bool": "BOOL", "uint8": "U8"}[str(value.dtype)]
        header[name] = {"dtype": code, "shape": list(value.shape), "data_offsets": [offset, offset + value.nbytes]}
        offset += value.nbytes
        data += value.tobytes()
    text = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(text)) + text + data


def _scan(payload: bytes, piece: int) -> PayloadScanner:
    scanner = PayloadScanner(len(payload))
    for i in range(0, len(payload), piece):
        scanner.feed(payload[i : i + piece])
    return scanner


@pytest.mark.parametrize("piece", [1, 3, 7, 64, 4096])
def test_scanner_finds_a_nan_split_across_pieces(piece: int) -> None:
    values = np.arange(300, dtype=np.float64)
    values[157] = np.nan
    payload = _payload({"a": np.ones(3, dtype=np.uint8), "b": values}, pad=3)
    assert not _scan(_payload({"a": np.ones(3, dtype=np.uint8), "b": np.arange(300.0)}, pad=3), piece).error
    with pytest.raises(TensorPayloadError, match="'b' contains NaN"):
        _scan(payload, piece).finish()


@pytest.mark.parametrize("piece", [1, 5, 1000])
def test_scanner_applies_the_bool_and_header_rules(piece: int) -> None:
    flags = np.array([1, 0, 2, 1], dtype=np.uint8).view(np.bool_)
    with pytest.raises(TensorPayloadError, match="BOOL bytes other than 0 and 1"):
        _scan(_payload({"f": flags}), piece).finish()
    with pytest.raises(TensorPayloadError, match="runs past the end"):
        _scan(_payload({"f": flags})[:20], piece).finish()
    with pytest.raises(TensorPayloadError, match="shorter than the 8-byte"):
        PayloadScanner(5).finish()


# --- ingest stores the very bytes it verified ---------------------------------------------------------


def test_ingest_stores_exactly_the_verified_bytes(tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir(parents=True)
    delivered = seal(inbox / "a.sob").read_bytes()
    folders, outcomes = run_ingest(tmp_path)
    assert [o.outcome for o in outcomes] == ["accepted"]
    stored = folders.root / outcomes[0].stored_as
    assert stored.read_bytes() == delivered
    entry = json.loads(stored.with_suffix(".json").read_text())
    assert entry["file_sha256"] == hashlib.sha256(delivered).hexdigest()
    assert stored.stat().st_mode & 0o077 == 0
    assert not list(folders.staging.iterdir())


# --- verify_bundle: every check, no payload kept --------------------------------------------------------


def test_verify_bundle_checks_everything_and_keeps_no_payload(parties, sealed: Path, tmp_path: Path, monkeypatch) -> None:
    from secure_oneshot.bundle import verify_bundle
    from secure_oneshot.bundle import verify as verify_module

    def refuse(*args, **kwargs):
        raise AssertionError("verify_bundle created a payload file")

    monkeypatch.setattr(verify_module, "_payload_buffer", refuse)
    verified = verify_bundle(sealed, parties.server, parties.trust, now=NOW)
    assert verified.tensor_specs["big"] == ("F32", (3 * SMALL_CHUNK // 4 + 123,))
    assert verified.tensor_specs["fc.weight"] == ("BF16", (2, 8))
    assert list(verified.tensor_specs) == sorted(verified.tensor_specs)
    forged = _rewrite_trailer(parties, sealed, tmp_path / "forged.sob", lambda t: t[:-1] + bytes([t[-1] ^ 1]))
    with pytest.raises(BundleAuthError, match="signature does not verify"):
        verify_bundle(forged, parties.server, parties.trust, now=NOW)
    values = np.zeros(10, dtype=np.float32)
    values[3] = np.nan
    nan = seal_tensors({"w": values}, tmp_path / "nan.sob", sender=parties.site, recipients=[parties.server.public], now=NOW)
    with pytest.raises(TensorPayloadError, match="NaN or infinite"):
        verify_bundle(nan.path, parties.server, parties.trust, now=NOW)


@pytest.mark.parametrize("chunks", [1, 2, 4, 5])
def test_payload_ending_on_a_chunk_boundary_streams_with_the_trailer_as_the_final_chunk(parties, tmp_path: Path, chunks: int) -> None:
    """Whole payload chunks are encrypted straight from the read window (never held back as a possible final
    chunk): a payload of exactly ``chunks`` chunks, window-aligned or not, opens, and an independent decryption
    finds the final flag on the trailer's chunk alone."""
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from secure_oneshot.bundle import seal as seal_module
    from secure_oneshot.bundle.format import TAG_SIZE
    from secure_oneshot.bundle.stream import chunk_nonce

    header = json.dumps({"w": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    n_floats = (chunks * SMALL_CHUNK - 8 - len(header) - 8) // 4  # header padded to 8 below: size = chunks * SMALL_CHUNK
    header = json.dumps({"w": {"dtype": "F32", "shape": [n_floats], "data_offsets": [0, 4 * n_floats]}}).encode()
    header += b" " * (-(8 + len(header) + 4 * n_floats) % SMALL_CHUNK)
    source = tmp_path / "w.safetensors"
    values = np.arange(n_floats, dtype=np.float32)
    source.write_bytes(struct.pack("<Q", len(header)) + header + values.tobytes())
    assert source.stat().st_size == chunks * SMALL_CHUNK
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(seal_module, "READ_WINDOW", 2 * SMALL_CHUNK)   # several windows, the last one full or partial
        seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public],
                              now=NOW, chunk_size=SMALL_CHUNK)
    opened = open_bundle(tmp_path / "b.sob", parties.server, parties.trust, now=NOW, out=tmp_path / "out.safetensors")
    assert np.array_equal(opened.tensors["w"], values)
    assert (tmp_path / "out.safetensors").read_bytes() == source.read_bytes()
    with open(tmp_path / "b.sob", "rb") as f:
        raw = read_header(f)
        aead = ChaCha20Poly1305(stream_key(unwrap_file_key(raw.header, parties.server), raw.header_bytes))
        f.seek(raw.stream_offset)
        sealed = f.read()
    step = SMALL_CHUNK + TAG_SIZE
    pieces = [sealed[i : i + step] for i in range(0, len(sealed), step)]
    assert len(pieces) == chunks + 1   # the payload's chunks, then the trailer's
    for index, piece in enumerate(pieces):
        aead.decrypt(chunk_nonce(index, index == len(pieces) - 1), piece, None)  # raises InvalidTag on a wrong flag
