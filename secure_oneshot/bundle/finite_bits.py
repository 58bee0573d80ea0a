"""NaN/Inf and BOOL checks on raw little-endian tensor bytes, without NumPy.

An IEEE 754 value is NaN or infinite exactly when all bits of its exponent
field are set, so the check needs the exponent fields only.  Python's integers
do the per-element work in C: the bytes become one integer (little-endian, so
element ``i`` occupies bits ``[w*i, w*(i+1))``), a shift brings every exponent
field to the bottom of its element, a mask keeps it, and adding 1 to every
element carries into the bit just above the field exactly when the field was
all ones (a field of ``e`` bits is at most ``2**e - 1``, so the carry never
leaves its element).

Cost: about 2.5 ms of CPU per MiB on this project's VM, against 0.1 ms for
NumPy's ``min``/``max`` once NumPy is imported, and importing NumPy costs about
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
    exponent, ones, carries = _masks_for(code, count)
    fields = (int.from_bytes(view, "little") >> low_bit) & exponent
    return not ((fields + ones) & carries)


def all_bool_bytes(data: bytes | bytearray | memoryview) -> bool:
    """True when every byte is 0 or 1 (what safetensors' BOOL allows)."""
    return not bytes(data).translate(None, b"\x00\x01")
