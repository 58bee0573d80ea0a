"""NaN/Inf and BOOL checks on raw little-endian tensor bytes, without NumPy.

An IEEE 754 value is NaN or infinite exactly when all bits of its exponent
field are set, so the check needs the exponent fields only.  Python's integers
do the per-element work in C: the bytes become one integer (little-endian, so
element ``i`` occupies bits ``[w*i, w*(i+1))``), a shift brings every exponent
field to the bottom of its element, a mask keeps it, and adding 1 to every
element carries into the bit just above the field exactly when the field was
all ones (a field of ``e`` bits is at most ``2**e - 1``, so the carry never
leaves its element).

A first pass looks at the top byte of each element alone (a strided slice of
``bytes``, which CPython copies in C): it holds the sign and the exponent
field's highest bits, and an element can be NaN or infinite only if those bits
are all ones (top byte ``0x7F``/``0xFF`` for F32, F64 and BF16, ``0x7C``-``0x7F``
and ``0xFC``-``0xFF`` for F16).  Trained weights almost never have such a top
byte (for F32 it means a magnitude of at least 2**127), so the integer pass
runs only for the blocks where one occurs, and it alone decides.

Cost on this project's VM, one thread: under 1 ms of CPU per MiB for the
first pass and about 3 ms per MiB for the integer pass, against 0.1 ms for
NumPy's ``min``/``max`` once NumPy is imported; importing NumPy costs about
0.17 CPU-s.  :class:`~.payload_scan.PayloadScanner` therefore uses this module
for payloads up to :data:`BIT_CHECK_MAX_BYTES` and NumPy above; both give the
same answer for every bit pattern (``tests/test_finite_bits.py``).
"""

from __future__ import annotations

__all__ = ["BIT_CHECK_MAX_BYTES", "EXPONENT_FIELDS", "all_finite_bytes", "all_bool_bytes"]

BIT_CHECK_MAX_BYTES = 48 << 20
"""Largest payload checked here; above it importing NumPy once costs less than these integer passes."""

EXPONENT_FIELDS: dict[str, tuple[int, int, int]] = {
    "F64": (8, 52, 11),   # dtype code -> (element bytes, exponent field's lowest bit, exponent bits)
    "F32": (4, 23, 8),
    "F16": (2, 10, 5),
    "BF16": (2, 7, 8),
}


def _top_byte_mask(code: str) -> int:
    """The bits of the top (last, little-endian) byte that belong to the exponent field."""
    width, low_bit, bits = EXPONENT_FIELDS[code]
    return ((((1 << bits) - 1) << low_bit) >> (8 * (width - 1))) & 0xFF


_NOT_SUSPECT_TOP_BYTES: dict[str, bytes] = {
    code: bytes(b for b in range(256) if b & _top_byte_mask(code) != _top_byte_mask(code)) for code in EXPONENT_FIELDS
}
"""Per code, the top-byte values that rule out NaN/Inf (some exponent bit in that byte is 0): deleted by the first pass."""

_masks: tuple[tuple[str, int], tuple[int, int, int]] | None = None   # the last (code, count) and its masks


def _lanes(pattern: int, width: int, count: int) -> int:
    """``pattern`` repeated in each of ``count`` elements of ``width`` bytes."""
    return int.from_bytes(pattern.to_bytes(width, "little") * count, "little")


def _masks_for(code: str, count: int) -> tuple[int, int, int]:
    """(exponent mask, ones, carry bits) for ``count`` elements; the last set is kept (pieces are mostly one size)."""
    global _masks
    cached = _masks
    if cached is not None and cached[0] == (code, count):
        return cached[1]
    width, _, bits = EXPONENT_FIELDS[code]
    masks = (_lanes((1 << bits) - 1, width, count), _lanes(1, width, count), _lanes(1 << bits, width, count))
    _masks = ((code, count), masks)
    return masks


def all_finite_bytes(data: bytes | bytearray | memoryview, code: str) -> bool:
    """True when no element of ``data`` (whole little-endian ``code`` values) is NaN or infinite.

    Raises:
        ValueError: ``code`` is not a float code, or ``data`` is not a whole number of elements (caller bugs).
    """
    width, low_bit, bits = EXPONENT_FIELDS[code]
    view = memoryview(data).cast("B")
    if len(view) % width:
        raise ValueError(f"{len(view)} bytes are not whole {code} elements")
    count = len(view) // width
    if not count:
        return True
    top_bytes = bytes(view)[width - 1::width]
    if not top_bytes.translate(None, _NOT_SUSPECT_TOP_BYTES[code]):
        return True   # no element has its top exponent bits all set
    exponent, ones, carries = _masks_for(code, count)
    fields = (int.from_bytes(view, "little") >> low_bit) & exponent
    return not ((fields + ones) & carries)


def all_bool_bytes(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte is 0 or 1 (what safetensors' BOOL allows)."""
    return not bytes(data).translate(None, b"\x00\x01")
