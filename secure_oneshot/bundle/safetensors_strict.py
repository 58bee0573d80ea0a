"""Strict safetensors: a streaming writer and a parser stricter than the reference loader.

The writer never materialises the file: it returns the header bytes plus
zero-copy views of each tensor's memory, which the sealer hashes and encrypts
in place.  The parser (FORMAT.md section 8) validates everything before it
builds a single tensor, and builds them as NumPy arrays that are views of the
decrypted buffer (:mod:`.arrays`: dtypes, bfloat16, conversion to torch).
NumPy is imported on first use, so reading a bundle's header or a policy does
not pay for it.

safetensors stores little-endian data; like the reference implementation we
assume a little-endian host.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .._internal.encoding import parse_strict_json
from ..errors import TensorPayloadError

__all__ = ["DTYPE_SIZES", "DEFAULT_ALLOWED_DTYPES", "MAX_DIMS", "MAX_DIM", "PayloadLimits", "TensorPayload", "serialize_tensors", "parse_payload", "read_layout", "header_length", "Layout"]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("secure_oneshot.bundle needs a little-endian host (safetensors is little-endian)")

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
"""The safetensors dtypes this format carries, with their element sizes in bytes (NumPy dtypes: ``arrays.DTYPES``)."""
DEFAULT_ALLOWED_DTYPES = frozenset(DTYPE_SIZES)
_ENTRY_FIELDS = {"dtype", "shape", "data_offsets"}
_MAX_NAME = 256
MAX_DIMS = 8
"""Most dimensions a tensor may have (FORMAT.md 8)."""
MAX_DIM = 1 << 40
"""Largest single dimension (FORMAT.md 8); a real dimension this large would not fit any payload anyway."""
MAX_HEADER_DEPTH = 32
"""Deepest JSON nesting in a safetensors header (a valid one nests 3 deep)."""


@dataclass(frozen=True)
class PayloadLimits:
    """Reader-side limits (FORMAT.md 8)."""

    max_header_bytes: int = 1 << 20
    allowed_dtypes: frozenset[str] = DEFAULT_ALLOWED_DTYPES
    reject_nonfinite: bool = True


@dataclass
class TensorPayload:
    """A validated payload: tensors (NumPy arrays, views of ``buffer``) and the ``__metadata__`` strings."""

    tensors: dict[str, Any]   # name -> numpy.ndarray
    metadata: dict[str, str] = field(default_factory=dict)


def _check_name(name: str) -> None:
    if not name or len(name) > _MAX_NAME or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError(f"tensor name {name!r} is empty, over {_MAX_NAME} characters, or has control characters")


def serialize_tensors(tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> list[memoryview]:
    """Segments whose concatenation is a safetensors file (header first, then data, sorted by name).

    ``tensors`` are NumPy arrays (:mod:`.arrays`) or torch tensors.  The tensor
    segments are views of the tensors' own memory (copied only when a tensor is
    not contiguous or not on the CPU).

    Raises:
        ValueError: unsupported dtype, bad name or metadata (caller bugs).
    """
    from .arrays import dtype_code, tensor_bytes

    header: dict[str, object] = {}
    if metadata:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise ValueError("safetensors metadata must map strings to strings")
        header["__metadata__"] = dict(metadata)
    segments, offset = [], 0
    for name in sorted(tensors):
        if name == "__metadata__":
            raise ValueError("'__metadata__' is reserved and cannot name a tensor")
        _check_name(name)
        tensor = tensors[name]
        code = dtype_code(tensor)
        if code not in DTYPE_SIZES:
            raise ValueError(f"tensor {name!r}: dtype {code} is not supported")
        data = tensor_bytes(tensor)
        header[name] = {"dtype": code, "shape": [int(d) for d in tensor.shape], "data_offsets": [offset, offset + len(data)]}
        segments.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    text += b" " * (-len(text) % 8)  # pad so tensor data starts 8-byte aligned
    return [memoryview(struct.pack("<Q", len(text)) + text), *segments]


def _bad(why: str) -> TensorPayloadError:
    return TensorPayloadError(f"payload rejected: {why}")


def header_length(prefix: bytes | memoryview, payload_len: int, limits: PayloadLimits) -> int:
    """The header length ``N`` from the first 8 bytes, checked against the cap and the payload length."""
    if payload_len < 8 or len(prefix) < 8:
        raise _bad("shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > limits.max_header_bytes:
        raise _bad(f"header length {n} exceeds the {limits.max_header_bytes}-byte cap")
    if 8 + n > payload_len:
        raise _bad(f"header length {n} runs past the end of the payload")
    return int(n)


def _read_header(buf: memoryview, limits: PayloadLimits, payload_len: int | None = None) -> tuple[dict[str, object], int]:
    n = header_length(buf, len(buf) if payload_len is None else payload_len, limits)
    raw = bytes(buf[8 : 8 + n]).rstrip(b" ")
    try:
        header = parse_strict_json(raw, canonical=False, max_depth=MAX_HEADER_DEPTH, max_bytes=limits.max_header_bytes)
    except ValueError as e:
        raise _bad(f"header is not valid JSON ({e})") from e
    if not isinstance(header, dict):
        raise _bad("header is not a JSON object")
    return header, 8 + n


def _metadata(value: object) -> dict[str, str]:
    if isinstance(value, dict) and _ENTRY_FIELDS & set(value):
        raise _bad("'__metadata__' is used as a tensor name")
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise _bad("'__metadata__' must map strings to strings")
    return value


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _is_int(x: object) -> bool:
    # bool is an int subclass in Python; JSON true must never pass as a size.
    return isinstance(x, int) and not isinstance(x, bool)


def _shape(name: str, shape: object) -> tuple[int, ...]:
    """Dimensions checked with Python ints before NumPy sees them: no overflow, no negative sizes."""
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise _bad(f"tensor {name!r}: shape must be a list of integers")
    if len(shape) > MAX_DIMS:
        raise _bad(f"tensor {name!r}: {len(shape)} dimensions, more than {MAX_DIMS}")
    if not all(0 <= d <= MAX_DIM for d in shape):
        raise _bad(f"tensor {name!r}: shape {shape} must have non-negative dimensions of at most 2^40")
    return tuple(shape)


def _entry(name: str, value: object, limits: PayloadLimits) -> _Entry:
    try:
        _check_name(name)
    except ValueError as e:
        raise _bad(str(e)) from e
    if not isinstance(value, dict) or set(value) != _ENTRY_FIELDS:
        raise _bad(f"tensor {name!r} must have exactly the fields dtype, shape, data_offsets")
    dtype, offsets = value["dtype"], value["data_offsets"]
    if not isinstance(dtype, str) or dtype not in limits.allowed_dtypes or dtype not in DTYPE_SIZES:
        raise _bad(f"tensor {name!r} has dtype {dtype!r}, not in the allow-list {sorted(limits.allowed_dtypes)}")
    shape = _shape(name, value["shape"])
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_int(x) and x >= 0 for x in offsets):
        raise _bad(f"tensor {name!r}: data_offsets must be two non-negative integers")
    begin, end = offsets
    # At most 8 dims of at most 2^40: the product is an exact Python int, compared before any allocation.
    if end < begin or end - begin != math.prod(shape) * DTYPE_SIZES[dtype]:
        raise _bad(f"tensor {name!r}: data_offsets {offsets} do not match shape {list(shape)} x {dtype}")
    return _Entry(name, dtype, shape, begin, end)


def _check_layout(entries: list[_Entry], data_len: int) -> None:
    position = 0
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin != position:
            kind = "overlaps another tensor" if e.begin < position else "leaves a hole before it"
            raise _bad(f"tensor {e.name!r} {kind} (offset {e.begin}, expected {position})")
        position = e.end
    if position != data_len:
        raise _bad(f"tensors cover {position} bytes but the data section has {data_len}")


def _materialise(e: _Entry, data: memoryview, base: int, limits: PayloadLimits, values_checked: bool = False) -> Any:
    import numpy as np

    from .arrays import DTYPES, all_finite

    dtype = DTYPES[e.dtype]
    if e.begin == e.end:
        return np.empty(e.shape, dtype=dtype)
    raw = data[e.begin : e.end]
    aligned = (base + e.begin) % dtype.itemsize == 0
    # np.frombuffer shares memory; unaligned data is copied so every operation on it is a plain aligned one.
    source = raw if aligned else bytearray(raw)
    array = np.frombuffer(source, dtype=dtype).reshape(e.shape)
    if values_checked:
        return array
    if e.dtype == "BOOL" and int(np.frombuffer(source, dtype=np.uint8).max()) > 1:
        raise _bad(f"tensor {e.name!r}: BOOL bytes other than 0 and 1")
    if limits.reject_nonfinite and not all_finite(array, e.dtype):
        raise _bad(f"tensor {e.name!r} contains NaN or infinite values")
    return array


@dataclass(frozen=True)
class Layout:
    """A checked safetensors header: where the data starts, the tensors (sorted by offset) and the metadata."""

    data_start: int
    entries: tuple[_Entry, ...]
    metadata: dict[str, str]


def read_layout(prefix: bytes | memoryview, payload_len: int, limits: PayloadLimits = PayloadLimits()) -> Layout:
    """Check the header and tensor layout of a ``payload_len``-byte payload from its first bytes (``prefix``
    must hold the whole header); no tensor byte is needed or read.

    Raises:
        TensorPayloadError: a header or layout rule of FORMAT.md section 8 is broken.
    """
    header, data_start = _read_header(memoryview(prefix).cast("B"), limits, payload_len)
    metadata = _metadata(header.pop("__metadata__")) if "__metadata__" in header else {}
    entries = [_entry(name, value, limits) for name, value in header.items()]
    _check_layout(entries, payload_len - data_start)
    return Layout(data_start, tuple(sorted(entries, key=lambda e: (e.begin, e.end))), metadata)


def parse_payload(buffer: bytearray | memoryview, limits: PayloadLimits = PayloadLimits(), *,
                  values_checked: bool = False) -> TensorPayload:
    """Validate a safetensors payload and return NumPy arrays that are views of ``buffer``.

    ``values_checked``: the BOOL and NaN/Inf rules were already applied to these
    bytes as they streamed past (:class:`.payload_scan.PayloadScanner`), so the
    tensor data is not read again (a memory-mapped payload stays unread).

    Raises:
        TensorPayloadError: any rule of FORMAT.md section 8 is broken.
    """
    buf = memoryview(buffer).cast("B")
    layout = read_layout(buf, len(buf), limits)
    data = buf[layout.data_start :]
    tensors = {e.name: _materialise(e, data, layout.data_start, limits, values_checked)
               for e in sorted(layout.entries, key=lambda e: e.name)}
    return TensorPayload(tensors, layout.metadata)
