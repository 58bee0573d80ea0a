"""The NumPy-free NaN/Inf and BOOL checks give NumPy's answer for every bit pattern, and the scanner's two paths agree."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from secure_oneshot.bundle import payload_scan
from secure_oneshot.bundle.arrays import BFLOAT16
from secure_oneshot.bundle.finite_bits import EXPONENT_FIELDS, all_bool_bytes, all_finite_bytes
from secure_oneshot.bundle.payload_scan import PayloadScanner
from secure_oneshot.errors import TensorPayloadError

from .subprocess_helpers import json_from_fresh_python

UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _numpy_finite(raw: np.ndarray, code: str) -> np.ndarray:
    """Per element: finite, as NumPy sees the value (a bfloat16 is the top half of the float32 with the same bits)."""
    if code == "BF16":
        return np.isfinite((raw.astype(np.uint32) << np.uint32(16)).view(np.float32))
    return np.isfinite(raw.view({"F64": np.float64, "F32": np.float32, "F16": np.float16}[code]))


def _patterns(code: str) -> np.ndarray:
    """Every 16-bit pattern for the 2-byte codes; for F32/F64 random bits plus every exponent with edge mantissas and signs."""
    width, low_bit, bits = EXPONENT_FIELDS[code]
    kind = UNSIGNED[width]
    if width == 2:
        return np.arange(1 << 16, dtype=np.uint32).astype(kind)
    rng = np.random.default_rng(7)
    random = rng.integers(0, np.iinfo(kind).max, size=200_000, dtype=kind, endpoint=True)
    exponents = np.arange(1 << bits, dtype=np.uint64)
    mantissas = np.array([0, 1, (1 << low_bit) - 1, 1 << (low_bit - 1)], dtype=np.uint64)
    edges = [(sign << np.uint64(width * 8 - 1)) | (e << np.uint64(low_bit)) | m
             for sign in (np.uint64(0), np.uint64(1)) for e in exponents for m in mantissas]
    return np.concatenate([random, np.array(edges, dtype=np.uint64).astype(kind)])


@pytest.mark.parametrize("code", sorted(EXPONENT_FIELDS))
def test_each_element_alone_matches_numpy(code: str) -> None:
    """Element by element (in blocks of one element): the bit check says non-finite exactly where NumPy does."""
    raw = _patterns(code)
    expected = _numpy_finite(raw, code)
    assert not expected.all() and expected.any()   # the patterns hold both kinds
    width = EXPONENT_FIELDS[code][0]
    data = raw.astype(raw.dtype.newbyteorder("<")).tobytes()
    sample = np.flatnonzero(~expected)[:300].tolist() + np.flatnonzero(expected)[:300].tolist()
    for i in sample:
        assert all_finite_bytes(data[i * width:(i + 1) * width], code) == bool(expected[i]), (code, hex(int(raw[i])))


@pytest.mark.parametrize("code", sorted(EXPONENT_FIELDS))
def test_one_bad_element_anywhere_in_a_block_is_found(code: str) -> None:
    """A block of finite values with one NaN/Inf pattern planted at each position in turn; neighbours never mask or fake it."""
    raw = _patterns(code)
    finite = raw[_numpy_finite(raw, code)]
    bad = raw[~_numpy_finite(raw, code)]
    block = np.resize(finite, 257)
    assert all_finite_bytes(block.tobytes(), code)
    rng = np.random.default_rng(3)
    for position in range(257):
        planted = block.copy()
        planted[position] = bad[rng.integers(len(bad))]
        assert not all_finite_bytes(planted.tobytes(), code), (code, position)
    # every finite pattern side by side, and every non-finite one alone in finite company
    assert all_finite_bytes(finite.tobytes(), code)
    assert not all_finite_bytes(np.concatenate([finite, bad[-1:]]).tobytes(), code)


def test_bool_bytes_allow_exactly_0_and_1() -> None:
    assert all_bool_bytes(b"") and all_bool_bytes(b"\x00\x01\x01\x00")
    for value in range(2, 256):
        assert not all_bool_bytes(b"\x00" * 100 + bytes([value]) + b"\x01" * 100), value


def test_a_partial_element_is_a_caller_bug() -> None:
    with pytest.raises(ValueError, match="not whole F32"):
        all_finite_bytes(b"\x00" * 6, "F32")


def _payload(tensors: dict[str, tuple[str, bytes, int]]) -> bytes:
    header, data = {}, b""
    for name, (dtype, raw, count) in tensors.items():
        header[name] = {"dtype": dtype, "shape": [count], "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _scan(payload: bytes, piece: int) -> TensorPayloadError | None:
    scanner = PayloadScanner(len(payload))
    for i in range(0, len(payload), piece):
        scanner.feed(payload[i:i + piece])
    return scanner.error


@pytest.mark.parametrize("code", sorted(EXPONENT_FIELDS))
@pytest.mark.parametrize("piece", [1, 3, 7, 4096])
def test_the_scanner_finds_a_split_nan_on_both_paths(code: str, piece: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A NaN whose bytes straddle two pieces, after finite values: the integer path and the NumPy path report the same."""
    width = EXPONENT_FIELDS[code][0]
    kind = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.float32}[code]
    good, nan = np.linspace(-3, 3, 101).astype(kind), np.array([np.nan], dtype=kind)
    if code == "BF16":   # the top 16 bits of each float32
        good, nan = ((a.view(np.uint32) >> np.uint32(16)).astype(np.uint16).view(BFLOAT16) for a in (good, nan))
    good, nan = good.tobytes(), nan.tobytes()
    clean = _payload({"a": ("BOOL", b"\x01\x00", 2), "w": (code, good + good, 202)})
    dirty = _payload({"a": ("BOOL", b"\x01\x00", 2), "w": (code, good + nan + good, 203)})
    results = []
    for limit in (1 << 40, 0):   # the integer path, then NumPy for every payload
        monkeypatch.setattr(payload_scan, "BIT_CHECK_MAX_BYTES", limit)
        assert _scan(clean, piece) is None
        error = _scan(dirty, piece)
        assert isinstance(error, TensorPayloadError) and "'w' contains NaN or infinite values" in error.message
        results.append(error.message)
        bad_bool = _scan(_payload({"a": ("BOOL", b"\x01\x02", 2)}), piece)
        assert bad_bool is not None and "BOOL bytes other than 0 and 1" in bad_bool.message
    assert results[0] == results[1]
    assert width == len(nan)


def test_scanning_a_small_payload_imports_no_numpy() -> None:
    """verify and seal of an ordinary bundle must not pay for NumPy's import to check values."""
    code = (
        "import json, struct, sys\n"
        "from secure_oneshot.bundle.payload_scan import PayloadScanner\n"
        "header = json.dumps({'w': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}}).encode()\n"
        "header += b' ' * (-len(header) % 8)\n"
        "ok = struct.pack('<Q', len(header)) + header + struct.pack('<2f', 1.0, -2.5)\n"
        "bad = struct.pack('<Q', len(header)) + header + struct.pack('<2f', 1.0, float('inf'))\n"
        "errors = []\n"
        "for payload in (ok, bad):\n"
        "    s = PayloadScanner(len(payload)); s.feed(payload); errors.append(None if s.error is None else s.error.message)\n"
        "print(json.dumps({'errors': errors, 'numpy': 'numpy' in sys.modules}))\n"
    )
    report = json_from_fresh_python(code, timeout=60)
    assert report["numpy"] is False
    assert report["errors"][0] is None and "NaN or infinite" in report["errors"][1]


@pytest.mark.parametrize("code", sorted(EXPONENT_FIELDS))
def test_the_top_byte_pass_sends_suspect_blocks_to_the_exact_check(code: str) -> None:
    """Finite values whose top byte looks like NaN/Inf (F32/F64/BF16: the largest exponent below all-ones) stay finite;
    plain weights are finite; one NaN or infinity among either is found."""
    width, low_bit, bits = EXPONENT_FIELDS[code]
    kind = UNSIGNED[width]
    largest_finite = ((1 << bits) - 2) << low_bit | ((1 << low_bit) - 1)   # exponent all ones but the lowest bit
    top = largest_finite >> (8 * (width - 1))
    weights = np.random.default_rng(0).standard_normal(4096)
    raw = {"F64": weights.view(np.uint64), "F32": weights.astype(np.float32).view(np.uint32),
           "F16": weights.astype(np.float16).view(np.uint16),
           "BF16": (weights.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)}[code]
    assert all_finite_bytes(raw.tobytes(), code)
    suspect = np.concatenate([raw, np.array([largest_finite, largest_finite | 1 << (8 * width - 1)], dtype=kind)])
    if code != "F16":   # the F16 exponent fits in its top byte: a suspect top byte is always NaN/Inf there
        assert top & 0x7F == 0x7F
    assert all_finite_bytes(suspect.tobytes(), code) == bool(_numpy_finite(suspect, code).all())
    for bad in (((1 << bits) - 1) << low_bit, ((1 << bits) - 1) << low_bit | 1):   # infinity, a NaN
        for block in (raw, suspect):
            planted = np.concatenate([block[:100], np.array([bad], dtype=kind), block[100:]])
            assert not all_finite_bytes(planted.tobytes(), code), (code, hex(bad))
