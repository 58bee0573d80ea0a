"""Generate the committed test vectors (FORMAT.md section 11) with fixed randomness.

    python -m tests.vectors.generate        # rewrites tests/vectors/*.sob, *.toml and keys/

The keys here are TEST-ONLY, derived from public labels and stored without
passphrase protection: never use them for anything real.  ``test_vectors.py``
re-runs :func:`build_bundles` and compares bytes, so any change to the format
or the writer breaks the vectors until they are deliberately regenerated.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import warnings
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path

import torch

from secure_oneshot.bundle.format import Header, stream_key
from secure_oneshot.bundle.inspect import read_header
from secure_oneshot.bundle.recipients import unwrap_file_key, wrap_file_key
from secure_oneshot.bundle.seal import _seal_segments, _Statement, write_stream
from secure_oneshot.bundle.stream import decrypt_stream
from secure_oneshot.keys import Identity, TrustEntry, TrustStore
from secure_oneshot.keys.keyfile import private_key_text
from secure_oneshot.keys.trust import trust_store_to_text

HERE = Path(__file__).resolve().parent
NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
CHUNK = 1 << 16
NAMES = ("site-a", "server", "escrow", "outsider", "rogue", "dpo", "ciso")


def drbg(label: str) -> Callable[[int], bytes]:
    """Deterministic bytes: SHA-256(label || counter) blocks.  Test vectors only."""
    state = {"counter": 0}

    def take(n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(f"{label}/{state['counter']}".encode()).digest()
            state["counter"] += 1
        return out[:n]

    return take


def identities() -> dict[str, Identity]:
    return {name: Identity(name, drbg(f"sign/{name}")(32), drbg(f"encrypt/{name}")(32)) for name in NAMES}


def trust_store(ids: dict[str, Identity]) -> TrustStore:
    return TrustStore().with_entry(TrustEntry(ids["site-a"].public, frozenset({"sender"}), note="test vectors"))


def _tensors() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2) / 8,
        "fc.bias": torch.tensor([0.5, -0.25], dtype=torch.float16),
        "steps": torch.tensor(7, dtype=torch.int64),
    }


def _big_tensors() -> dict[str, torch.Tensor]:
    return {"w": (torch.arange(150_000, dtype=torch.int32) % 251).to(torch.uint8)}  # 150 KB: three 64 KiB chunks


def _seal(ids, label: str, out_segments, recipients, sender="site-a", now=NOW, valid=timedelta(days=7), **statement) -> bytes:
    from secure_oneshot.bundle.safetensors_strict import serialize_tensors

    segments = out_segments if isinstance(out_segments, list) else serialize_tensors(out_segments)
    path = Path(tempfile.mkdtemp()) / "v.sob"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _seal_segments(segments, path, ids[sender], [ids[r].public for r in recipients], _Statement(**statement),
                       valid_for=valid, now=now, chunk_size=CHUNK, progress=None, unsafe_rng=drbg(label))
    data = path.read_bytes()
    path.unlink()
    path.parent.rmdir()
    return data


def payload_sha256(tensors: dict[str, torch.Tensor]) -> str:
    from secure_oneshot.bundle.safetensors_strict import serialize_tensors

    return hashlib.sha256(b"".join(bytes(s) for s in serialize_tensors(tensors))).hexdigest()


def _forwarded(ids, original: bytes) -> bytes:
    """The server re-encrypts the site's signed payload to the outsider (surreptitious forwarding)."""
    path = Path(tempfile.mkdtemp()) / "v.sob"
    path.write_bytes(original)
    with open(path, "rb") as f:
        raw = read_header(f)
        file_key = unwrap_file_key(raw.header, ids["server"])
        payload = bytearray(raw.header.payload_size)
        trailer = decrypt_stream(f, len(original) - raw.stream_offset, stream_key(file_key, raw.header_bytes), CHUNK, memoryview(payload))
    rng = drbg("forwarded")
    new_key = rng(32)
    h = raw.header
    header = Header(h.bundle_id, h.sender, (wrap_file_key(new_key, ids["outsider"].public, rng(32)),), h.created, h.expires, h.policy_id, h.payload_size, h.chunk_size)
    with open(path, "wb") as f:
        write_stream(f, header.to_bytes(), new_key, CHUNK, [memoryview(payload)], lambda digest: bytes(trailer))
    data = path.read_bytes()
    path.unlink()
    path.parent.rmdir()
    return data


def _flip(data: bytes, position: int) -> bytes:
    mutated = bytearray(data)
    mutated[position] ^= 0x01
    return bytes(mutated)


def build_bundles() -> dict[str, tuple[bytes, dict[str, object]]]:
    """name -> (bundle bytes, declaration).  Deterministic."""
    ids = identities()
    ok = _seal(ids, "ok_one_recipient", _tensors(), ["server"], policy_id="example-study/v1", dp={"epsilon": "8.0", "delta": "1e-05"})
    multi = _seal(ids, "ok_three_recipients", _big_tensors(), ["server", "escrow", "outsider"])
    duplicate = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    evil = (len(duplicate)).to_bytes(8, "little") + duplicate + b"\x00\x00\x80\x3f"
    header_end = 22 + int.from_bytes(ok[18:22], "big")
    stream_start = header_end + 32
    multi_stream_start = 22 + int.from_bytes(multi[18:22], "big") + 32
    return {
        "ok_one_recipient": (ok, {"expect": "success", "recipient": "server", "description": "one recipient, three tensors, policy id and DP record", "payload_sha256": payload_sha256(_tensors())}),
        "ok_three_recipients": (multi, {"expect": "success", "recipient": "escrow", "description": "three recipients, a payload spanning three 64 KiB chunks, opened by the second", "payload_sha256": payload_sha256(_big_tensors())}),
        "ok_empty_payload": (_seal(ids, "ok_empty", {}, ["server"]), {"expect": "success", "recipient": "server", "description": "no tensors at all", "payload_sha256": payload_sha256({})}),
        "bad_magic_version": (b"secure-oneshot/v9\n" + ok[18:], {"expect": "format", "recipient": "server", "description": "unknown format version"}),
        "bad_header_mac": (_flip(ok, header_end + 3), {"expect": "auth", "recipient": "server", "description": "one bit of the header MAC flipped"}),
        "bad_stream_bitflip": (_flip(ok, stream_start + 40), {"expect": "auth", "recipient": "server", "description": "one bit of the first chunk flipped"}),
        "bad_truncated_at_chunk": (multi[: multi_stream_start + (CHUNK + 16)], {"expect": "auth", "recipient": "escrow", "description": "cut after the first full chunk"}),
        "bad_appended": (ok + b"\x00", {"expect": "auth", "recipient": "server", "description": "one byte appended"}),
        "bad_forwarded": (_forwarded(ids, ok), {"expect": "auth", "recipient": "outsider", "description": "the server re-encrypted the site's signed payload to the outsider"}),
        "bad_untrusted_sender": (_seal(ids, "rogue", _tensors(), ["server"], sender="rogue"), {"expect": "trust", "recipient": "server", "description": "sender not in the trust store"}),
        "bad_expired": (_seal(ids, "expired", _tensors(), ["server"], now=NOW - timedelta(days=8)), {"expect": "freshness", "recipient": "server", "description": "expired a day before verification time"}),
        "bad_not_recipient": (ok, {"expect": "not-recipient", "recipient": "outsider", "description": "valid bundle opened by someone it was not sent to"}),
        "bad_payload_duplicate_names": (_seal(ids, "dup", [memoryview(evil)], ["server"]), {"expect": "payload", "recipient": "server", "description": "validly signed payload with a duplicate tensor name"}),
    }


def _declaration(bundle: bytes, fields: dict[str, object]) -> str:
    lines = ["# Test vector for FORMAT.md section 11. Generated by tests/vectors/generate.py.",
             f"expect = {json.dumps(fields['expect'])}", f"description = {json.dumps(fields['description'])}",
             f"recipient = {json.dumps(fields['recipient'])}", "now = 2026-11-26T12:00:00Z",
             f"bundle_sha256 = {json.dumps(hashlib.sha256(bundle).hexdigest())}"]
    if "payload_sha256" in fields:
        lines.append(f"payload_sha256 = {json.dumps(fields['payload_sha256'])}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ids = identities()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, identity in ids.items():
            text = "# TEST-ONLY KEY from tests/vectors/generate.py: public, never use it for real data.\n" + private_key_text(identity, None)
            (HERE / "keys" / f"{name}.key").write_text(text)
            (HERE / "keys" / f"{name}.key").chmod(0o600)  # loaders refuse private keys others can read
            (HERE / "keys" / f"{name}.pub").write_text(identity.public.to_text())
    (HERE / "keys" / "trust.toml").write_text(trust_store_to_text(trust_store(ids)))
    for name, (bundle, fields) in build_bundles().items():
        (HERE / f"{name}.sob").write_bytes(bundle)
        (HERE / f"{name}.toml").write_text(_declaration(bundle, fields))
        print(f"{name:32s} {fields['expect']:14s} {len(bundle):7d} bytes")


if __name__ == "__main__":
    main()
