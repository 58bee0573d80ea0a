"""Check a safetensors payload as it streams past, in pieces of any size, with bounded memory.

The sealer reads the source file and the opener decrypts the bundle chunk by
chunk; neither holds the payload.  :class:`PayloadScanner` applies every rule of
FORMAT.md section 8 to the pieces in order: it collects the header (at most
``PayloadLimits.max_header_bytes``), checks it and the tensor layout with the
strict parser (:func:`.safetensors_strict.read_layout`), then checks the BOOL
bytes and, when asked, the NaN/Inf rule over each tensor's bytes as they arrive.
A floating-point element split across two pieces is carried over (at most 7
bytes).  Memory: the header plus a temporary the size of one piece.

The element checks read the bytes: BOOL bytes must be 0 or 1; a float is NaN
or infinite when its exponent bits are all set.  Payloads up to
:data:`.finite_bits.BIT_CHECK_MAX_BYTES` are checked with Python integers
(:mod:`.finite_bits`), larger ones with NumPy, whose import costs more than
the integer passes over a small payload; a caller that imports NumPy anyway
(one that builds arrays of the payload) asks for NumPy whatever the size.

The first failure is kept, not raised: a reader must not report a payload rule
before the signature and digest have passed (FORMAT.md 7, step 12 comes after
steps 10-11), so it raises :attr:`PayloadScanner.error` at step 12.  A writer may
raise it at once (:meth:`PayloadScanner.raise_if_failed`).
"""

from __future__ import annotations

from typing import Any

from ..errors import TensorPayloadError
from .finite_bits import BIT_CHECK_MAX_BYTES, all_bool_bytes, all_finite_bytes
from .safetensors_strict import DTYPE_SIZES, Layout, PayloadLimits, header_length, read_layout

__all__ = ["PayloadScanner"]

_FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})


class PayloadScanner:
    """Feed the ``size`` bytes of a payload in order with :meth:`feed`; then read :attr:`error` / :attr:`layout`."""

    def __init__(self, size: int, limits: PayloadLimits = PayloadLimits(), *, numpy: bool | None = None) -> None:
        """``numpy``: check values with NumPy (True: the caller imports it anyway), or not; None: by payload size."""
        self._size = size
        self._limits = limits
        self._position = 0              # payload bytes fed so far
        self._head = bytearray()        # the header while it is being collected
        self._head_len = -1             # 8 + N once N is known
        self.layout: Layout | None = None
        self.error: TensorPayloadError | None = None
        self._tensor = 0                # index into layout.entries of the tensor being scanned
        self._carry = bytearray()       # bytes of an element split across pieces
        self._numpy = size > BIT_CHECK_MAX_BYTES if numpy is None else numpy   # NumPy, or finite_bits
        if size < 8:
            self.error = TensorPayloadError("payload rejected: shorter than the 8-byte header length")

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        """Check the next ``len(piece)`` payload bytes (the view is not kept)."""
        view = memoryview(piece).cast("B")
        start = self._position
        self._position += len(view)
        if self.error is not None:
            return
        try:
            if self.layout is None:
                view, start = self._collect_header(view, start)
            if self.layout is not None and len(view):
                self._scan(view, start - self.layout.data_start)
        except TensorPayloadError as e:
            self.error = e

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> Layout:
        """The checked layout once every byte was fed; raises the first failure."""
        self.raise_if_failed()
        if self.layout is None or self._position != self._size:
            raise TensorPayloadError(f"payload rejected: {self._position} of {self._size} bytes were checked")
        return self.layout

    # -- header --------------------------------------------------------------

    def _collect_header(self, view: memoryview, start: int) -> tuple[memoryview, int]:
        """Add to the header; once complete, check it.  Returns what of ``view`` lies past the header."""
        want = 8 if self._head_len < 0 else self._head_len
        take = max(0, min(len(view), want - len(self._head)))
        self._head += view[:take]
        view, start = view[take:], start + take
        if self._head_len < 0 and len(self._head) == 8:
            self._head_len = 8 + header_length(self._head, self._size, self._limits)
            return self._collect_header(view, start)
        if self._head_len >= 0 and len(self._head) == self._head_len:
            self.layout = read_layout(self._head, self._size, self._limits)
            self._head = bytearray()
        return view, start

    # -- tensor data ---------------------------------------------------------

    def _scan(self, view: memoryview, at: int) -> None:
        """Check ``view``, which holds the data section's bytes from offset ``at``."""
        assert self.layout is not None
        entries, end = self.layout.entries, at + len(view)
        while at < end and self._tensor < len(entries):
            entry = entries[self._tensor]
            if at >= entry.end:
                self._tensor += 1
                continue
            stop = min(end, entry.end)
            self._check(entry, view[at - (end - len(view)) : stop - (end - len(view))])
            at = stop

    def _check(self, entry: Any, piece: memoryview) -> None:
        if entry.dtype == "BOOL":
            if not all_bool_bytes(piece):
                raise TensorPayloadError(f"payload rejected: tensor {entry.name!r}: BOOL bytes other than 0 and 1")
            return
        if entry.dtype not in _FLOAT_CODES or not self._limits.reject_nonfinite:
            return
        size = DTYPE_SIZES[entry.dtype]
        if self._carry:
            take = min(size - len(self._carry), len(piece))
            self._carry += piece[:take]
            piece = piece[take:]
            if len(self._carry) == size:
                element, self._carry = bytes(self._carry), bytearray()
                self._finite(entry, element)
        whole = len(piece) - len(piece) % size
        if whole:
            self._finite(entry, piece[:whole])
        if whole < len(piece):
            self._carry += piece[whole:]

    def _finite(self, entry: Any, data: bytes | memoryview) -> None:
        if self._numpy:
            import numpy as np

            from .arrays import DTYPES, all_finite

            finite = all_finite(np.frombuffer(data, dtype=DTYPES[entry.dtype]), entry.dtype)
        else:
            finite = all_finite_bytes(data, entry.dtype)
        if not finite:
            raise TensorPayloadError(f"payload rejected: tensor {entry.name!r} contains NaN or infinite values")
