"""Malicious safetensors payloads, signed by a *trusted* sender, are refused with clear errors.

The reference loader accepts several of these (it silently keeps the last of
duplicate names, for one); the strict parser must not.
"""

from __future__ import annotations

import json
import struct
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secure_oneshot.bundle import PayloadLimits, VerifyOptions, open_bundle, parse_payload, seal_safetensors_file
from secure_oneshot.bundle.arrays import to_torch
from secure_oneshot.bundle.safetensors_strict import serialize_tensors
from secure_oneshot.bundle.seal import _seal_segments, _Statement
from secure_oneshot.errors import TensorPayloadError

from .conftest import NOW, sample_tensors


def raw_safetensors(header: dict | str | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """Hand-built safetensors bytes: u64le(N) || header || data (the header may be any text)."""
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def entry(dtype: str, shape: list[int], begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


F32_PAIR = struct.pack("<2f", 1.0, 2.0)

MALICIOUS = {
    # Both entries cover the same bytes, so the reference loader sees no hole and keeps the last one.
    "duplicate names": (raw_safetensors('{"a":' + json.dumps(entry("F32", [2], 0, 8)) + ',"a":' + json.dumps(entry("I32", [2], 0, 8)) + "}", F32_PAIR), "duplicate key 'a'"),
    "overlapping offsets": (raw_safetensors({"a": entry("F32", [2], 0, 8), "b": entry("F32", [1], 4, 8)}, F32_PAIR), "overlaps"),
    "hole between tensors": (raw_safetensors({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, F32_PAIR + F32_PAIR[:4]), "leaves a hole"),
    "trailing data": (raw_safetensors({"a": entry("F32", [1], 0, 4)}, F32_PAIR), "cover 4 bytes"),
    "huge header length": (raw_safetensors("{}", length=1 << 40), "exceeds"),
    "header past the end": (raw_safetensors("{}", length=1000), "runs past the end"),
    "metadata as tensor name": (raw_safetensors({"__metadata__": entry("F32", [2], 0, 8)}, F32_PAIR), "'__metadata__' is used as a tensor name"),
    "non-string metadata": (raw_safetensors({"__metadata__": {"k": 1}}), "strings to strings"),
    "disallowed dtype": (raw_safetensors({"a": entry("F8_E4M3", [2], 0, 2)}, b"\x00\x01"), "not in the allow-list"),
    "shape/offset mismatch": (raw_safetensors({"a": entry("F32", [3], 0, 8)}, F32_PAIR), "do not match shape"),
    "negative shape": (raw_safetensors({"a": entry("F32", [-2], 0, 8)}, F32_PAIR), "non-negative"),
    "extra entry field": (raw_safetensors({"a": {**entry("F32", [2], 0, 8), "x": 1}}, F32_PAIR), "exactly the fields"),
    "header not an object": (raw_safetensors("[1, 2]"), "not a JSON object"),
    "invalid UTF-8": (raw_safetensors(b'{"\xff":1}'), "UTF-8"),
    "bool out of range": (raw_safetensors({"m": entry("BOOL", [2], 0, 2)}, b"\x01\x02"), "BOOL bytes"),
    "control character in name": (raw_safetensors({"a\nb": entry("F32", [2], 0, 8)}, F32_PAIR), "control characters"),
    "NaN value": (raw_safetensors({"a": entry("F32", [2], 0, 8)}, struct.pack("<2f", 1.0, float("nan"))), "NaN or infinite"),
    "infinite value": (raw_safetensors({"a": entry("F16", [1], 0, 2)}, struct.pack("<e", float("inf"))), "NaN or infinite"),
    "too short": (b"\x01\x02", "shorter than"),
}


@pytest.mark.parametrize("case", sorted(MALICIOUS))
def test_parser_rejects(case: str) -> None:
    payload, message = MALICIOUS[case]
    with pytest.raises(TensorPayloadError, match=message):
        parse_payload(bytearray(payload))


@pytest.mark.parametrize("case", ["duplicate names", "overlapping offsets", "huge header length", "metadata as tensor name", "disallowed dtype", "NaN value", "hole between tensors"])
def test_signed_malicious_payload_is_refused_after_verification(parties, tmp_path: Path, case: str) -> None:
    """A trusted sender's valid signature does not make a bad payload acceptable."""
    payload, message = MALICIOUS[case]
    out = tmp_path / "evil.sob"
    _seal_segments([memoryview(payload)], out, parties.site, [parties.server.public], _Statement(),
                   valid_for=timedelta(days=1), now=NOW, chunk_size=1 << 16, progress=None, unsafe_rng=None)
    with pytest.raises(TensorPayloadError, match=message) as caught:
        open_bundle(out, parties.server, parties.trust, now=NOW)
    assert caught.value.exit_code == 13


def test_reference_loader_keeps_last_duplicate_but_we_refuse() -> None:
    """Documents why the strict parser exists: the reference parser silently accepts duplicates."""
    from safetensors.torch import load

    payload, _ = MALICIOUS["duplicate names"]
    assert load(payload)["a"].dtype == torch.int32  # the first declaration silently lost
    with pytest.raises(TensorPayloadError):
        parse_payload(bytearray(payload))


def test_nan_allowed_when_check_disabled(parties, tmp_path: Path) -> None:
    tensors = {"a": torch.tensor([1.0, float("nan"), float("inf")])}
    source = tmp_path / "nan.safetensors"
    source.write_bytes(b"".join(serialize_tensors(tensors)))
    with pytest.raises(TensorPayloadError, match="NaN"):
        seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public])
    lenient = PayloadLimits(reject_nonfinite=False)
    result = seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public], limits=lenient, now=NOW)
    opened = open_bundle(result.path, parties.server, parties.trust, now=NOW, options=VerifyOptions(limits=lenient))
    assert torch.equal(to_torch(opened.tensors["a"]).isnan(), tensors["a"].isnan())


def test_dtype_allow_list_is_configurable() -> None:
    payload = bytearray(b"".join(serialize_tensors({"a": torch.zeros(2, dtype=torch.float64)})))
    parse_payload(payload)
    with pytest.raises(TensorPayloadError, match="allow-list"):
        parse_payload(payload, PayloadLimits(allowed_dtypes=frozenset({"F32"})))


def test_header_cap_is_configurable() -> None:
    payload = bytearray(b"".join(serialize_tensors(sample_tensors())))
    with pytest.raises(TensorPayloadError, match="cap"):
        parse_payload(payload, PayloadLimits(max_header_bytes=64))


def test_seal_refuses_an_unsafe_file(parties, tmp_path: Path) -> None:
    source = tmp_path / "dup.safetensors"
    source.write_bytes(MALICIOUS["duplicate names"][0])
    with pytest.raises(TensorPayloadError, match="duplicate"):
        seal_safetensors_file(source, tmp_path / "b.sob", sender=parties.site, recipients=[parties.server.public])
    assert not (tmp_path / "b.sob").exists()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_parser_never_crashes_on_garbage(data: bytes) -> None:
    """Fuzz-style: arbitrary bytes are either a valid payload or a TensorPayloadError, never a crash."""
    try:
        parse_payload(bytearray(data))
    except TensorPayloadError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=1, max_size=120))
def test_parser_never_crashes_on_mutated_headers(noise: bytes) -> None:
    valid = bytearray(b"".join(serialize_tensors({"a": torch.ones(3), "b": torch.zeros(2, dtype=torch.int8)})))
    for i, byte in enumerate(noise):
        valid[(i * 7) % len(valid)] = byte
    try:
        parse_payload(valid)
    except TensorPayloadError:
        pass


# bfloat16 bit patterns (little-endian u16): sign | 8 exponent bits | 7 mantissa bits.
BF16_FINITE = {"one": 0x3F80, "minus two": 0xC000, "largest": 0x7F7F, "smallest subnormal": 0x0001, "minus zero": 0x8000}
BF16_NONFINITE = {"+inf": 0x7F80, "-inf": 0xFF80, "quiet NaN": 0x7FC0, "negative NaN": 0xFFC1, "signalling NaN": 0x7F81}


@pytest.mark.parametrize("bits", list(BF16_NONFINITE.values()), ids=list(BF16_NONFINITE))
def test_bf16_nonfinite_is_refused_wherever_it_sits(bits: int) -> None:
    """The BF16 check reads exponent bits; a bad value is found past the first chunk of the check too."""
    count = (1 << 20) + 5   # one element past the check's first chunk
    values = [0x3F80] * count
    values[-1] = bits
    payload = raw_safetensors({"w": entry("BF16", [count], 0, 2 * count)}, struct.pack(f"<{count}H", *values))
    with pytest.raises(TensorPayloadError, match="'w' contains NaN or infinite values"):
        parse_payload(bytearray(payload))
    assert parse_payload(bytearray(payload), PayloadLimits(reject_nonfinite=False)).tensors["w"].shape == (count,)


def test_bf16_finite_extremes_pass_and_convert_to_torch_exactly() -> None:
    bits = list(BF16_FINITE.values())
    payload = raw_safetensors({"w": entry("BF16", [len(bits)], 0, 2 * len(bits))}, struct.pack(f"<{len(bits)}H", *bits))
    array = parse_payload(bytearray(payload)).tensors["w"]
    tensor = to_torch(array)
    assert tensor.dtype == torch.bfloat16 and tensor.view(torch.int16).numpy().view("<u2").tolist() == bits
    assert tensor[:2].tolist() == [1.0, -2.0]


def test_parsed_tensors_are_numpy_views_and_round_trip_bit_exactly() -> None:
    """What the parser returns: NumPy arrays over the buffer (no copy), each dtype; re-serialised, the same bytes."""
    import numpy as np

    payload = bytearray(b"".join(serialize_tensors(sample_tensors(), {"note": "x"})))
    parsed = parse_payload(payload)
    assert all(isinstance(t, np.ndarray) for t in parsed.tensors.values())
    assert str(parsed.tensors["conv.weight"].dtype) == "float32" and parsed.tensors["steps"].shape == ()
    assert np.shares_memory(parsed.tensors["bn.running_mean"], np.frombuffer(payload, dtype=np.uint8))  # first, so aligned
    assert bytes(b"".join(serialize_tensors(parsed.tensors, parsed.metadata))) == bytes(payload)
    for name, tensor in sample_tensors().items():
        assert torch.equal(to_torch(parsed.tensors[name]), tensor), name


@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
def test_numpy_nonfinite_is_refused(dtype: str) -> None:
    import numpy as np

    for bad in (np.nan, np.inf, -np.inf):
        values = np.array([0.0, 1.0, bad, 2.0], dtype=dtype)
        with pytest.raises(TensorPayloadError, match="NaN or infinite"):
            parse_payload(bytearray(b"".join(serialize_tensors({"x": values}))))
