"""Fuzz the bundle reader: mutants of valid bundles in every region, none accepted, no foreign exception.

Builds two valid bundles (a multi-chunk one with 64 KiB chunks and a small
one), then makes ``--mutants`` mutants with a seeded RNG and opens each with
``inspect_bundle`` and ``open_bundle`` as the server.  Four families of mutants:

* **raw**: bit flips (anywhere, or in a named region: magic, header length,
  header JSON, header MAC, first/last stream chunk, last tag), overwritten,
  inserted and deleted ranges, truncation, appended bytes (up to past the
  largest trailer), chunk swaps/duplicates/drops, hostile header-length fields
  and magics.
* **header**: the public header re-encoded by an attacker with hostile values
  (huge or negative sizes, 64 GiB + 1, 8 TiB, floats, deep nesting, wrong
  types), dropped/extra fields, broken stanzas, non-canonical JSON, a whole
  header of nested brackets.
* **resealed**: what anyone can write to the server: a valid stanza, MAC and
  stream under the attacker's own file key, claiming the trusted site as
  sender, with a mutated manifest, manifest length, signature, trailer, or a
  ``payload_size`` that does not match the payload.
* **site-signed**: what a compromised trusted site can write: correctly signed
  bundles whose manifest disagrees with the header or nests too deep, or whose
  safetensors payload is hostile (deep header, huge offsets, bad shapes,
  unknown dtypes, duplicate names, NaN, BOOL 2, ...).

Every mutant differs from the bundle it came from and must be refused: the
script counts outcomes by error class and exits non-zero if any mutant was
accepted or raised anything but a ``SecureOneshotError``.  It also fuzzes
``parse_payload`` directly with mutated safetensors headers (those may be
valid; only the exception type is checked).

    python benchmarks/fuzz_bundles.py [--mutants 20000] [--seed 1] [--json]
    python benchmarks/fuzz_bundles.py --memory      # peak RSS of open_bundle, see RESULTS.md

``--memory`` opens, each in a fresh child process, bundles with 10 MB and
200 MB payloads and a hostile file claiming a huge payload, and reports peak
RSS over the process's RSS just before ``open_bundle``.
"""

from __future__ import annotations

import argparse
import base64
import collections
import hashlib
import io
import json
import math
import os
import random
import resource
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

NOW = datetime(2026, 11, 26, 12, 0, 0, tzinfo=timezone.utc)
CHUNK = 1 << 16
TAG = 16
MAGIC = b"secure-oneshot/v1\n"
MiB = 1 << 20


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """Valid bundles and what is inside them, plus the keys to make and open more."""

    site: Any
    server: Any
    trust: Any
    bundles: list[bytes]
    headers: list[Any]
    payloads: list[bytes]
    manifests: list[bytes]
    signatures: list[bytes]


def _tensors(big: bool) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(7)
    tensors = {
        "conv.weight": torch.randn(4, 3, 3, 3, generator=g),
        "bn.running_mean": torch.randn(4, generator=g, dtype=torch.float64),
        "fc.bias": torch.randn(2, generator=g).to(torch.float16),
        "mask": torch.tensor([True, False]),
        "steps": torch.tensor(3, dtype=torch.int64),
        "empty": torch.zeros(0, 3),
    }
    if big:
        tensors["big"] = torch.randn(3 * CHUNK // 4 + 5, generator=g)  # spans several 64 KiB chunks
    return tensors


def _decrypt(data: bytes, server: Any) -> tuple[Any, bytes, bytes, bytes]:
    """Header, payload, manifest bytes and signature of a valid bundle (as its recipient)."""
    from secure_oneshot.bundle.format import stream_key
    from secure_oneshot.bundle.inspect import read_header
    from secure_oneshot.bundle.recipients import unwrap_file_key
    from secure_oneshot.bundle.stream import decrypt_stream

    src = io.BytesIO(data)
    raw = read_header(src)
    payload = bytearray(raw.header.payload_size)
    key = stream_key(unwrap_file_key(raw.header, server), raw.header_bytes)
    trailer = decrypt_stream(src, raw.stream_length, key, raw.header.chunk_size, memoryview(payload))
    n = int.from_bytes(trailer[:4], "big")
    return raw.header, bytes(payload), bytes(trailer[4 : 4 + n]), bytes(trailer[4 + n :])


def build_corpus(workdir: Path) -> Corpus:
    from secure_oneshot.bundle import seal_tensors
    from secure_oneshot.keys import Identity, TrustEntry, TrustStore

    site, server = Identity.generate("site-a"), Identity.generate("server")
    trust = TrustStore().with_entry(TrustEntry(site.public, frozenset({"sender"})))
    corpus = Corpus(site, server, trust, [], [], [], [], [])
    for i, big in enumerate((True, False)):
        path = workdir / f"valid{i}.sob"
        meta = {"artifacts": {"classifier": {"architecture": "small-cnn", "classes": 2}}}
        seal_tensors(_tensors(big), path, sender=site, recipients=[server.public], now=NOW, chunk_size=CHUNK, meta=meta)
        data = path.read_bytes()
        header, payload, manifest, signature = _decrypt(data, server)
        corpus.bundles.append(data)
        corpus.headers.append(header)
        corpus.payloads.append(payload)
        corpus.manifests.append(manifest)
        corpus.signatures.append(signature)
    return corpus


# --------------------------------------------------------------------------- hostile values


def deep(depth: int, opener: str = "[") -> Any:
    """A JSON value nested ``depth`` deep, built as text (no Python recursion needed to make it)."""
    return RawJson(("[" * depth + "]" * depth) if opener == "[" else ('{"a":' * depth + "0" + "}" * depth))


class RawJson(str):
    """JSON text spliced verbatim into a document by :func:`dumps`."""


def dumps(value: Any, *, canonical: bool = True) -> bytes:
    """``json.dumps`` that splices :class:`RawJson` values in verbatim (to carry 100,000-deep nesting)."""
    slots: dict[str, str] = {}

    def swap(v: Any) -> Any:
        if isinstance(v, RawJson):
            token = f"@@raw{len(slots)}@@"
            slots[token] = str(v)
            return token
        if isinstance(v, dict):
            return {k: swap(x) for k, x in v.items()}
        if isinstance(v, list):
            return [swap(x) for x in v]
        return v

    text = json.dumps(swap(value), sort_keys=canonical, separators=(",", ":") if canonical else (", ", ": "))
    for token, raw in slots.items():
        text = text.replace(json.dumps(token), raw)
    return text.encode("utf-8")


def hostile_values(rng: random.Random) -> Any:
    pool: list[Callable[[], Any]] = [
        lambda: None, lambda: True, lambda: False, lambda: -1, lambda: 0, lambda: 1,
        lambda: 2**31, lambda: 2**32 + 1, lambda: 2**53 - 1, lambda: 2**53, lambda: 2**63, lambda: 2**64, lambda: -(2**64),
        lambda: 10**400, lambda: (1 << 36) + 1, lambda: 8 << 40, lambda: 1.5, lambda: 1e308, lambda: -0.0,
        lambda: "", lambda: "x" * rng.choice((1, 129, 5000)), lambda: "ab" * 16, lambda: "\u0000\u202e\ud800"[: rng.randint(1, 3)],
        lambda: "2026-11-26T12:00:00Z", lambda: [], lambda: {}, lambda: [[]], lambda: {"a": {"b": []}},
        lambda: deep(rng.choice((33, 40, 1000, 20000))), lambda: deep(rng.choice((33, 500, 20000)), "{"),
        lambda: [rng.random() for _ in range(3)], lambda: {"history": [{"steps": 2**64}] * 3},
    ]
    return rng.choice(pool)()


# --------------------------------------------------------------------------- layout


def layout(data: bytes) -> tuple[int, int]:
    """(end of header JSON, start of stream) of a bundle's bytes."""
    header_end = len(MAGIC) + 4 + int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    return header_end, header_end + 32


def chunk_starts(data: bytes) -> list[int]:
    return list(range(layout(data)[1], len(data), CHUNK + TAG))


def _header_obj(data: bytes) -> dict[str, Any]:
    header_end, _ = layout(data)
    return json.loads(data[len(MAGIC) + 4 : header_end])


def _with_header(data: bytes, body: bytes) -> bytes:
    header_end, _ = layout(data)
    return MAGIC + len(body).to_bytes(4, "big") + body + data[header_end:]


def _flip(data: bytes, rng: random.Random, low: int, high: int, flips: int = 1) -> bytes:
    out = bytearray(data)
    for _ in range(flips):
        position = rng.randrange(max(0, low), max(low + 1, min(high, len(out))))
        out[position] ^= 1 << rng.randrange(8)
    return bytes(out)


# --------------------------------------------------------------------------- raw mutators


def m_bitflip(rng: random.Random, c: Corpus, b: int) -> bytes:
    return _flip(c.bundles[b], rng, 0, len(c.bundles[b]), rng.randint(1, 8))


def m_bitflip_region(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    header_end, stream = layout(data)
    starts = chunk_starts(data)
    regions = {
        "magic": (0, len(MAGIC)), "header_len": (len(MAGIC), len(MAGIC) + 4), "header": (len(MAGIC) + 4, header_end),
        "mac": (header_end, stream), "first_chunk": (stream, min(len(data), stream + CHUNK + TAG)),
        "last_chunk": (starts[-1], len(data)), "last_tag": (len(data) - TAG, len(data)),
    }
    low, high = regions[rng.choice(sorted(regions))]
    return _flip(data, rng, low, high)


def m_overwrite(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    start = rng.randrange(len(data))
    size = rng.randint(1, 64)
    return data[:start] + rng.randbytes(size) + data[start + size :]


def m_insert(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    at = rng.randrange(len(data) + 1)
    return data[:at] + rng.randbytes(rng.choice((1, 4, 16, 17, 100))) + data[at:]


def m_delete(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    at = rng.randrange(len(data))
    return data[:at] + data[at + rng.randint(1, 200) :]


def m_truncate(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    return data[: rng.randrange(len(data))]


def m_append(rng: random.Random, c: Corpus, b: int) -> bytes:
    size = rng.choice((1, 15, 16, 17, CHUNK + TAG, 3 * CHUNK, MiB + 4 * CHUNK))  # the last: past the largest trailer
    return c.bundles[b] + (bytes(size) if size > CHUNK else rng.randbytes(size))


def m_chunks(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[0]  # the multi-chunk bundle
    starts = chunk_starts(data)
    chunks = [data[s:e] for s, e in zip(starts, [*starts[1:], len(data)])]
    kind = rng.choice(("swap", "duplicate", "drop", "reverse"))
    i = rng.randrange(len(chunks) - 1)
    if kind == "swap":
        chunks[i], chunks[i + 1] = chunks[i + 1], chunks[i]
    elif kind == "duplicate":
        chunks.insert(i, chunks[i])
    elif kind == "drop":
        del chunks[i]
    else:
        chunks.reverse()
    return data[: starts[0]] + b"".join(chunks)


def m_header_len(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    real = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 4], "big")
    value = rng.choice((0, 1, real - 1, real + 1, real + 32, 65536, 65537, 2**31, 2**32 - 1, rng.randrange(2**32)))
    return MAGIC + value.to_bytes(4, "big") + data[len(MAGIC) + 4 :]


def m_magic(rng: random.Random, c: Corpus, b: int) -> bytes:
    data = c.bundles[b]
    magic = rng.choice((b"secure-oneshot/v2\n", b"secure-oneshot/v1\r", b"SECURE-ONESHOT/v1\n", b"", b"\x00" * 18, rng.randbytes(18)))
    return magic + data[len(MAGIC) :]


# --------------------------------------------------------------------------- header mutators (MAC and stream kept)


HEADER_FIELDS = ("format", "bundle_id", "sender", "recipients", "created", "expires", "policy_id", "payload_size", "chunk_size")


def m_header_field(rng: random.Random, c: Corpus, b: int) -> bytes:
    obj = _header_obj(c.bundles[b])
    obj[rng.choice(HEADER_FIELDS)] = hostile_values(rng)
    return _with_header(c.bundles[b], dumps(obj))


def m_header_sizes(rng: random.Random, c: Corpus, b: int) -> bytes:
    obj = _header_obj(c.bundles[b])
    real = obj["payload_size"]
    obj[rng.choice(("payload_size", "chunk_size"))] = rng.choice((
        0, 1, real - 1, real + 1, real + CHUNK, 1 << 16, 1 << 17, 1 << 24, 1 << 25, (1 << 24) - 1,
        1 << 36, (1 << 36) + 1, 1 << 40, 8 << 40, 2**53 - 1, 2**62, -1,
    ))
    return _with_header(c.bundles[b], dumps(obj))


def m_header_fields_set(rng: random.Random, c: Corpus, b: int) -> bytes:
    obj = _header_obj(c.bundles[b])
    if rng.random() < 0.5:
        del obj[rng.choice(HEADER_FIELDS)]
    else:
        obj[rng.choice(("extra", "Format", "payload_size ", "__proto__"))] = hostile_values(rng)
    return _with_header(c.bundles[b], dumps(obj))


def m_header_stanza(rng: random.Random, c: Corpus, b: int) -> bytes:
    obj = _header_obj(c.bundles[b])
    stanza = obj["recipients"][0]
    kind = rng.choice(("field", "many", "duplicate", "drop_key", "not_object", "short_key", "bad_b64"))
    if kind == "field":
        stanza[rng.choice(("key_id", "epk", "wrapped_key"))] = hostile_values(rng)
    elif kind == "many":
        obj["recipients"] = [dict(stanza, key_id=f"{i:032x}") for i in range(rng.choice((16, 17, 1000)))]
    elif kind == "duplicate":
        obj["recipients"] = [stanza, stanza]
    elif kind == "drop_key":
        del stanza[rng.choice(("key_id", "epk", "wrapped_key"))]
    elif kind == "not_object":
        obj["recipients"] = [hostile_values(rng)]
    elif kind == "short_key":
        stanza["wrapped_key"] = base64.b64encode(rng.randbytes(rng.choice((0, 32, 47, 49)))).decode()
    else:
        stanza["epk"] = stanza["epk"].rstrip("=") + rng.choice(("", "==", "!", " "))
    return _with_header(c.bundles[b], dumps(obj))


def m_header_deep(rng: random.Random, c: Corpus, b: int) -> bytes:
    depth = rng.choice((33, 100, 5000, 30000))
    if rng.random() < 0.5:
        body = dumps(deep(depth, rng.choice("[{")))
    else:
        obj = _header_obj(c.bundles[b])
        obj[rng.choice(HEADER_FIELDS)] = deep(depth, rng.choice("[{"))
        body = dumps(obj)
    return _with_header(c.bundles[b], body[:65536])


def m_header_noncanonical(rng: random.Random, c: Corpus, b: int) -> bytes:
    obj = _header_obj(c.bundles[b])
    kind = rng.choice(("spaces", "unsorted", "duplicate", "escape", "trailing"))
    if kind == "spaces":
        body = dumps(obj, canonical=False)
    elif kind == "unsorted":
        body = json.dumps(dict(reversed(list(obj.items()))), separators=(",", ":")).encode()
    elif kind == "duplicate":
        body = dumps(obj)[:-1] + b',"policy_id":""}'
    elif kind == "escape":
        body = dumps(obj).replace(b'"format"', b'"\\u0066ormat"')
    else:
        body = dumps(obj) + rng.choice((b" ", b"\n", b"{}", b"\x00"))
    return _with_header(c.bundles[b], body)


# --------------------------------------------------------------------------- resealed mutators (attacker's own file key)


def reseal(c: Corpus, rng: random.Random, header: Any, payload: bytes, trailer: bytes) -> bytes:
    """A bundle with a valid stanza, MAC and stream to the server, under a fresh file key."""
    from secure_oneshot.bundle.recipients import wrap_file_key
    from secure_oneshot.bundle.seal import write_stream

    file_key = rng.randbytes(32)
    header = replace(header, recipients=(wrap_file_key(file_key, c.server.public),))
    out = io.BytesIO()
    write_stream(out, header.to_bytes(), file_key, header.chunk_size, [memoryview(payload)], lambda digest: trailer)
    return out.getvalue()


def _trailer(manifest: bytes, signature: bytes) -> bytes:
    return len(manifest).to_bytes(4, "big") + manifest + signature


def m_resealed_manifest(rng: random.Random, c: Corpus, b: int) -> bytes:
    manifest = c.manifests[b]
    if rng.random() < 0.5:
        manifest = _flip(manifest, rng, 0, len(manifest), rng.randint(1, 4))
    else:
        obj = json.loads(manifest)
        obj[rng.choice(sorted(obj))] = hostile_values(rng)
        manifest = dumps(obj)
        if manifest == c.manifests[b]:
            manifest += b" "
    return reseal(c, rng, c.headers[b], c.payloads[b], _trailer(manifest, c.signatures[b]))


def m_resealed_signature(rng: random.Random, c: Corpus, b: int) -> bytes:
    sig = c.signatures[b]
    sig = rng.choice((_flip(sig, rng, 0, 64), bytes(64), rng.randbytes(64), sig[:63], sig + b"\x00", sig[32:] + sig[:32]))
    return reseal(c, rng, c.headers[b], c.payloads[b], _trailer(c.manifests[b], sig))


def m_resealed_trailer(rng: random.Random, c: Corpus, b: int) -> bytes:
    trailer = _trailer(c.manifests[b], c.signatures[b])
    kind = rng.choice(("length", "cut", "extra", "empty_manifest"))
    if kind == "length":
        n = rng.choice((0, 1, len(c.manifests[b]) - 1, len(c.manifests[b]) + 1, (1 << 20) + 1, 2**32 - 1))
        trailer = n.to_bytes(4, "big") + trailer[4:]
    elif kind == "cut":
        trailer = trailer[: rng.randrange(1, len(trailer))]
    elif kind == "extra":
        trailer += rng.randbytes(rng.randint(1, 100))
    else:
        trailer = _trailer(b"", c.signatures[b])
    return reseal(c, rng, c.headers[b], c.payloads[b], trailer)


def m_resealed_split(rng: random.Random, c: Corpus, b: int) -> bytes:
    """The header (and stream key) says a different payload_size than the payload the digest covers."""
    shift = rng.choice((-100, -1, 1, 4, 100))
    header = replace(c.headers[b], payload_size=max(0, c.headers[b].payload_size + shift))
    return reseal(c, rng, header, c.payloads[b], _trailer(c.manifests[b], c.signatures[b]))


# --------------------------------------------------------------------------- site-signed mutators (compromised trusted site)


def site_signed(c: Corpus, rng: random.Random, b: int, payload: bytes, edit: Callable[[dict[str, Any]], None] | None = None) -> bytes:
    """A correctly signed bundle from the trusted site carrying ``payload`` and a manifest ``edit``ed after the fact."""
    from secure_oneshot.bundle.format import signed_message

    header = replace(c.headers[b], payload_size=len(payload))
    obj = json.loads(c.manifests[b])
    obj["payload_size"], obj["payload_sha256"] = len(payload), hashlib.sha256(payload).hexdigest()
    if edit is not None:
        edit(obj)
    manifest = dumps(obj)
    return reseal(c, rng, header, payload, _trailer(manifest, c.site.sign(signed_message(manifest))))


def m_signed_manifest(rng: random.Random, c: Corpus, b: int) -> bytes:
    """Signed manifests that must still be refused: disagreeing with the header, too deep, floats, unknown fields."""
    edits: list[Callable[[dict[str, Any]], None]] = [
        lambda m: m.__setitem__("recipients", [c.site.key_id]),
        lambda m: m.__setitem__("recipients", []),
        lambda m: m.__setitem__("bundle_id", "0" * 32),
        lambda m: m.__setitem__("expires", "2027-01-01T00:00:00Z"),
        lambda m: m.__setitem__("payload_size", m["payload_size"] + 1),
        lambda m: m.__setitem__("payload_sha256", "0" * 64),
        lambda m: m.__setitem__("meta", {"x": deep(rng.choice((32, 33, 1000, 50000)))}),
        lambda m: m.__setitem__("dp", {"classifier": deep(rng.choice((31, 40, 3000)), "{")}),
        lambda m: m.__setitem__("meta", {"x": 1.5}),
        lambda m: m.__setitem__("meta", {"x": 2**53}),
        lambda m: m.__setitem__("extra", 1),
        lambda m: m.pop("policy_sha256"),
        lambda m: m.__setitem__("format", "secure-oneshot/v2 manifest"),
    ]
    return site_signed(c, rng, b, c.payloads[b], rng.choice(edits))


def _safetensors(header: Any, data: bytes, *, pad: bool = True) -> bytes:
    text = header if isinstance(header, bytes) else dumps(header, canonical=False)
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def hostile_safetensors(rng: random.Random) -> bytes:
    """A safetensors payload that breaks a FORMAT.md section 8 rule (never a valid one)."""
    f32 = struct.pack("<2f", 1.0, 2.0)
    entry = lambda dtype="F32", shape=None, offsets=None: {  # noqa: E731
        "dtype": dtype, "shape": [2] if shape is None else shape, "data_offsets": [0, 8] if offsets is None else offsets}
    cases: list[Callable[[], bytes]] = [
        lambda: _safetensors({"t": entry(shape=deep(rng.choice((33, 1000, 50000))))}, f32),
        lambda: _safetensors(b'{"t":' + b"[" * 100_000, f32),
        lambda: _safetensors({"t": entry(shape=[0, 2**64], offsets=[0, 0])}, b""),
        lambda: _safetensors({"t": entry(shape=[2**64, 2**64])}, f32),
        lambda: _safetensors({"t": entry(shape=[-1, -2])}, f32),
        lambda: _safetensors({"t": entry(shape=[1] * 9, offsets=[0, 4])}, f32[:4]),
        lambda: _safetensors({"t": entry(shape=[2**40] * 8)}, f32),
        lambda: _safetensors({"t": entry(shape=[True, 2])}, f32),
        lambda: _safetensors({"t": entry(shape="2")}, f32),
        lambda: _safetensors({"t": entry(shape=[2.0])}, f32),
        lambda: _safetensors({"t": entry(offsets=[0, 2**70])}, f32),
        lambda: _safetensors({"t": entry(offsets=[8, 0])}, f32),
        lambda: _safetensors({"t": entry(offsets=[0, rng.choice((4, 16, 2**63))])}, f32),
        lambda: _safetensors({"t": entry(dtype=rng.choice((["F32"], {"F32": 1}, 4, None, "F8", "f32", "")))}, f32),
        lambda: _safetensors(b'{"t":' + json.dumps(entry()).encode() + b',"t":' + json.dumps(entry()).encode() + b"}", f32),
        lambda: _safetensors({"__metadata__": entry()}, f32),
        lambda: _safetensors({"__metadata__": {"a": 1}, "t": entry()}, f32),
        lambda: _safetensors({"t": {**entry(), "extra": 1}}, f32),
        lambda: _safetensors({"": entry()}, f32),
        lambda: _safetensors({"\x01": entry()}, f32),
        lambda: _safetensors({"a": entry(), "b": entry()}, f32),  # overlapping
        lambda: _safetensors({"t": entry()}, f32 + b"\x00" * 8),  # hole at the end
        lambda: _safetensors({"t": entry()}, struct.pack("<2f", math.nan, 1.0)),
        lambda: _safetensors({"t": entry()}, struct.pack("<2f", math.inf, 1.0)),
        lambda: _safetensors({"t": entry(dtype="BOOL", shape=[2], offsets=[0, 2])}, b"\x01\x02"),
        lambda: _safetensors({"t": entry()}, f32, pad=False)[:-1],
        lambda: struct.pack("<Q", rng.choice((2**63, 2**64 - 1, 1 << 21, 10**6))) + b"{}",
        lambda: struct.pack("<Q", 2) + b"[]",
        lambda: struct.pack("<Q", 4) + b"nul",
        lambda: _safetensors(b'{"t":1.5e999}', b""),
        lambda: _safetensors(b'{"t": NaN}', b""),
        lambda: _safetensors(b"\xff\xfe{}", b""),
        lambda: rng.randbytes(rng.randint(0, 7)),
    ]
    return rng.choice(cases)()


def m_signed_payload(rng: random.Random, c: Corpus, b: int) -> bytes:
    return site_signed(c, rng, b, hostile_safetensors(rng))


MUTATORS: dict[str, tuple[str, Callable[[random.Random, Corpus, int], bytes]]] = {
    "bitflip": ("raw", m_bitflip), "bitflip_region": ("raw", m_bitflip_region), "overwrite": ("raw", m_overwrite),
    "insert": ("raw", m_insert), "delete": ("raw", m_delete), "truncate": ("raw", m_truncate),
    "append": ("raw", m_append), "chunks": ("raw", m_chunks), "header_len": ("raw", m_header_len),
    "magic": ("raw", m_magic),
    "header_field": ("header", m_header_field), "header_sizes": ("header", m_header_sizes),
    "header_fields_set": ("header", m_header_fields_set), "header_stanza": ("header", m_header_stanza),
    "header_deep": ("header", m_header_deep), "header_noncanonical": ("header", m_header_noncanonical),
    "resealed_manifest": ("resealed", m_resealed_manifest), "resealed_signature": ("resealed", m_resealed_signature),
    "resealed_trailer": ("resealed", m_resealed_trailer), "resealed_split": ("resealed", m_resealed_split),
    "signed_manifest": ("site-signed", m_signed_manifest), "signed_payload": ("site-signed", m_signed_payload),
}


def mutate(rng: random.Random, corpus: Corpus, name: str | None = None) -> tuple[str, bytes]:
    """One mutant (name of its mutator, bytes) that differs from every valid bundle."""
    while True:
        chosen = name or rng.choice(sorted(MUTATORS))
        data = MUTATORS[chosen][1](rng, corpus, rng.randrange(len(corpus.bundles)))
        if data not in corpus.bundles:
            return chosen, data


# --------------------------------------------------------------------------- running


@dataclass
class Tally:
    outcomes: collections.Counter[str]
    accepted: list[str]
    foreign: list[str]  # "mutator: ExceptionType: message" for anything not a SecureOneshotError


def try_open(path: Path, corpus: Corpus, name: str, tally: Tally) -> None:
    """inspect then open one mutant; record the outcome."""
    from secure_oneshot.bundle import inspect_bundle, open_bundle
    from secure_oneshot.errors import SecureOneshotError

    try:
        try:
            inspect_bundle(path)
        except SecureOneshotError:
            pass
        open_bundle(path, corpus.server, corpus.trust, now=NOW)
    except SecureOneshotError as e:
        tally.outcomes[type(e).__name__] += 1
        return
    except Exception as e:  # noqa: BLE001 - the point is to catch anything that is not ours
        tally.outcomes["FOREIGN " + type(e).__name__] += 1
        tally.foreign.append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
        return
    tally.outcomes["ACCEPTED"] += 1
    tally.accepted.append(name)


def fuzz_bundles(corpus: Corpus, workdir: Path, mutants: int, seed: int) -> Tally:
    rng = random.Random(seed)
    tally = Tally(collections.Counter(), [], [])
    path = workdir / "mutant.sob"
    names = sorted(MUTATORS)
    for i in range(mutants):
        # Round-robin over mutators so every region is covered at any count.
        name, data = mutate(rng, corpus, names[i % len(names)])
        path.write_bytes(data)
        try_open(path, corpus, name, tally)
    return tally


def valid_safetensors(corpus: Corpus) -> bytes:
    return corpus.payloads[0]


def fuzz_parse_payload(corpus: Corpus, mutants: int, seed: int) -> Tally:
    """Mutated safetensors payloads straight into ``parse_payload``: only ``TensorPayloadError`` may escape."""
    from secure_oneshot.bundle import parse_payload
    from secure_oneshot.errors import TensorPayloadError

    rng = random.Random(seed)
    tally = Tally(collections.Counter(), [], [])
    base = valid_safetensors(corpus)
    header_len = 8 + struct.unpack("<Q", base[:8])[0]
    for _ in range(mutants):
        if rng.random() < 0.5:
            data = hostile_safetensors(rng)
        else:
            data = _flip(base, rng, 0, header_len, rng.randint(1, 6))
        try:
            parse_payload(bytearray(data))
        except TensorPayloadError as e:
            tally.outcomes[type(e).__name__] += 1
        except Exception as e:  # noqa: BLE001
            tally.outcomes["FOREIGN " + type(e).__name__] += 1
            tally.foreign.append(f"parse_payload: {type(e).__name__}: {str(e)[:200]}")
        else:
            tally.outcomes["parsed"] += 1
    return tally


# --------------------------------------------------------------------------- memory phase


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


def _memory_parties() -> tuple[Any, Any, Any]:
    """Fixed keys (derived from a seed), so the seal and open children agree without files."""
    from secure_oneshot.keys import Identity, TrustEntry, TrustStore

    site = Identity("site-a", hashlib.sha256(b"site").digest(), hashlib.sha256(b"site-x").digest())
    server = Identity("server", hashlib.sha256(b"server").digest(), hashlib.sha256(b"server-x").digest())
    return site, server, TrustStore().with_entry(TrustEntry(site.public, frozenset({"sender"})))


def memory_seal(case: str, path: Path) -> None:
    """Write the bundle for ``case`` (in its own process, so its memory does not count)."""
    import torch

    from secure_oneshot.bundle import seal_tensors
    from secure_oneshot.bundle.format import Header, header_mac
    from secure_oneshot.bundle.recipients import wrap_file_key

    site, server, _ = _memory_parties()
    payload_mb = {"10MB": 10, "200MB": 200}.get(case)
    if payload_mb is not None:
        tensors = {"w": torch.randn(payload_mb * 1_000_000 // 4, generator=torch.Generator().manual_seed(1))}
        seal_tensors(tensors, path, sender=site, recipients=[server.public], now=NOW)
        return
    # Hostile: a valid stanza and MAC, a header claiming 60 GiB, a 4 KiB stream (or a sparse 8 TiB file).
    file_key = os.urandom(32)
    header = Header("ab" * 16, site.key_id, (wrap_file_key(file_key, server.public),), "2026-11-26T12:00:00Z",
                    "2026-12-03T12:00:00Z", "", 60 << 30, 1 << 20)
    hb = header.to_bytes()
    path.write_bytes(hb + header_mac(file_key, hb) + bytes(4096))
    if case == "sparse-8TiB":
        os.truncate(path, 8 << 40)


def memory_open(case: str, path: Path) -> dict[str, Any]:
    """Open the bundle in this fresh process; report RSS just before ``open_bundle`` and the peak."""
    import gc

    from secure_oneshot.bundle import VerifyOptions, open_bundle
    from secure_oneshot.errors import SecureOneshotError

    _, server, trust = _memory_parties()
    gc.collect()
    before = _current_rss_mib()
    start = time.perf_counter()
    outcome, size = "opened", 0
    try:
        opened = open_bundle(path, server, trust, now=NOW, options=VerifyOptions(max_payload_bytes=None))
        size = opened.header.payload_size
    except SecureOneshotError as e:
        outcome = f"{type(e).__name__}: {e.message[:90]}"
    elapsed = time.perf_counter() - start
    peak = _peak_rss_mib()
    return {"case": case, "outcome": outcome, "file_bytes": path.stat().st_size, "payload_mib": size / MiB,
            "rss_before_mib": round(before, 1), "peak_mib": round(peak, 1),
            "over_payload_mib": round(peak - before - size / MiB, 1), "seconds": round(elapsed, 3)}


def run_memory(workdir: Path) -> list[dict[str, Any]]:
    rows = []
    for case in ("10MB", "200MB", "hostile-60GiB-claim", "sparse-8TiB"):
        path = workdir / f"{case}.sob"
        for phase in ("seal", "open"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", case, "--phase", phase, "--workdir", str(workdir)],
                                 capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        path.unlink()
    return rows


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mutants", type=int, default=20_000)
    parser.add_argument("--payload-mutants", type=int, default=None, help="parse_payload mutants (default: --mutants / 4)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of open_bundle instead of fuzzing")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("seal", "open"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory(prefix="fuzz-bundles-") as tmp:
        workdir = args.workdir or Path(tmp)
        if args.memory_child:
            path = workdir / f"{args.memory_child}.sob"
            if args.phase == "seal":
                memory_seal(args.memory_child, path)
            else:
                print(json.dumps(memory_open(args.memory_child, path)))
            return 0
        if args.memory:
            rows = run_memory(workdir)
            if args.json:
                print(json.dumps(rows))
            for r in rows:
                print(f"{r['case']:<22} {r['outcome'][:60]:<60} payload {r['payload_mib']:8.1f} MiB  "
                      f"peak {r['peak_mib']:7.1f} MiB  over payload+baseline {r['over_payload_mib']:6.1f} MiB  {r['seconds']:.3f} s")
            return 0
        return run_fuzz(args, workdir)


def run_fuzz(args: argparse.Namespace, workdir: Path) -> int:
    wall, cpu = time.perf_counter(), time.process_time()
    corpus = build_corpus(workdir)
    bundles = fuzz_bundles(corpus, workdir, args.mutants, args.seed)
    payload_n = args.payload_mutants if args.payload_mutants is not None else args.mutants // 4
    payloads = fuzz_parse_payload(corpus, payload_n, args.seed)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    report = {
        "command": " ".join(["python", "benchmarks/fuzz_bundles.py", *sys.argv[1:]]),
        "mutants": args.mutants, "seed": args.seed, "bundle_outcomes": dict(sorted(bundles.outcomes.items())),
        "accepted": len(bundles.accepted), "non_library_exceptions": len(bundles.foreign) + len(payloads.foreign),
        "payload_mutants": payload_n, "payload_outcomes": dict(sorted(payloads.outcomes.items())),
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "peak_rss_mib": round(_peak_rss_mib(), 1),
        "examples": (bundles.foreign + payloads.foreign + bundles.accepted)[:10],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.mutants} bundle mutants (seed {args.seed}):")
        for name, count in report["bundle_outcomes"].items():
            print(f"  {name:<28} {count}")
        print(f"{payload_n} parse_payload mutants:")
        for name, count in report["payload_outcomes"].items():
            print(f"  {name:<28} {count}")
        print(f"accepted {report['accepted']}, non-library exceptions {report['non_library_exceptions']}")
        print(f"wall {report['wall_s']} s, CPU {report['cpu_s']} s, peak RSS {report['peak_rss_mib']} MiB")
        for line in report["examples"]:
            print("  !", line)
    return 1 if report["accepted"] or report["non_library_exceptions"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
