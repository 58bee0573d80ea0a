"""Round trips: 1 and 3 recipients, every dtype, empty and 0-d tensors, large multi-chunk payloads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load as reference_load

from secure_oneshot.bundle import inspect_bundle, open_bundle, seal_safetensors_file, seal_tensors
from secure_oneshot.bundle.arrays import to_torch
from secure_oneshot.bundle.safetensors_strict import serialize_tensors
from secure_oneshot.bundle.stream import plaintext_length

from .conftest import NOW, SMALL_CHUNK, assert_same_tensors, sample_tensors, seal_sample


@pytest.mark.parametrize("n_recipients", [1, 3])
def test_every_recipient_opens_bit_identical_tensors(parties, tmp_path: Path, n_recipients: int) -> None:
    everyone = [parties.server, parties.escrow, parties.outsider][:n_recipients]
    out = tmp_path / "b.sob"
    result = seal_sample(parties, out, recipients=[p.public for p in everyone], dp={"epsilon": "4.0"}, meta={"arch": "cnn"})
    for recipient in everyone:
        opened = open_bundle(out, recipient, parties.trust, now=NOW)
        assert_same_tensors(opened.tensors, sample_tensors(big=True))
        assert opened.manifest == result.manifest
        assert opened.manifest.dp == {"epsilon": "4.0"} and opened.sender == parties.site.public


def test_payload_is_a_standard_safetensors_file(parties, tmp_path: Path) -> None:
    opened = open_bundle(seal_sample(parties, tmp_path / "b.sob").path, parties.server, parties.trust, now=NOW)
    assert_same_tensors(reference_load(bytes(opened.payload_bytes)), sample_tensors(big=True))
    assert hashlib.sha256(opened.payload_bytes).hexdigest() == opened.manifest.payload_sha256


def test_seal_file_keeps_bytes_and_digest(parties, tmp_path: Path) -> None:
    source = tmp_path / "m.safetensors"
    source.write_bytes(b"".join(serialize_tensors(sample_tensors(), {"note": "x"})))
    result = seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], now=NOW)
    opened = open_bundle(result.path, parties.server, parties.trust, now=NOW)
    assert bytes(opened.payload_bytes) == source.read_bytes()
    assert opened.payload.metadata == {"note": "x"}
    out = opened.save_payload(tmp_path / "out.safetensors")
    assert out.read_bytes() == source.read_bytes() and (out.stat().st_mode & 0o777) == 0o600


def test_empty_payload_dict_round_trips(parties, tmp_path: Path) -> None:
    result = seal_tensors({}, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], now=NOW)
    assert open_bundle(result.path, parties.server, parties.trust, now=NOW).tensors == {}


def test_gpu_style_noncontiguous_inputs_are_serialised_by_value(parties, tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    result = seal_tensors({"t": base.t()}, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], now=NOW)
    assert torch.equal(to_torch(open_bundle(result.path, parties.server, parties.trust, now=NOW).tensors["t"]), base.t())


@pytest.mark.parametrize("payload_floats", [0, 1, SMALL_CHUNK // 4 - 40, SMALL_CHUNK // 4, 2 * SMALL_CHUNK // 4 + 1])
def test_chunk_boundaries(parties, tmp_path: Path, payload_floats: int) -> None:
    """Payloads that end just before, on and after chunk boundaries."""
    tensors = {"x": torch.arange(payload_floats, dtype=torch.float32)}
    result = seal_tensors(tensors, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], now=NOW, chunk_size=SMALL_CHUNK)
    assert_same_tensors(open_bundle(result.path, parties.server, parties.trust, now=NOW).tensors, tensors)


def test_public_header_matches_what_was_sealed(parties, sealed: Path) -> None:
    header = inspect_bundle(sealed)
    assert header.sender == parties.site.key_id
    assert header.recipient_ids == (parties.server.key_id,)
    assert header.created == "2026-11-26T12:00:00Z" and header.expires == "2026-12-03T12:00:00Z"
    stream_bytes = sealed.stat().st_size - len(header.to_bytes()) - 32  # minus magic, length, header, MAC
    assert plaintext_length(stream_bytes, header.chunk_size) > header.payload_size


_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]


@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 5), max_size=3), min_size=0, max_size=5),
    dtype_indices=st.lists(st.integers(0, len(_DTYPES) - 1), min_size=5, max_size=5),
)
def test_property_round_trip(parties, tmp_path_factory, shapes, dtype_indices) -> None:
    g = torch.Generator().manual_seed(len(shapes))
    tensors = {}
    for i, shape in enumerate(shapes):
        dtype = _DTYPES[dtype_indices[i]]
        t = torch.randint(0, 2 if dtype == torch.bool else 100, shape, generator=g)
        tensors[f"t{i}"] = t.to(dtype)
    out = tmp_path_factory.mktemp("prop") / "b.sob"
    seal_tensors(tensors, out, sender=parties.site, recipients=[parties.server.public], now=NOW)
    assert_same_tensors(open_bundle(out, parties.server, parties.trust, now=NOW).tensors, tensors)
