"""Tensors on the transfer path are NumPy arrays; this module maps them to and from safetensors dtypes.

The transfer path (keys, policies, bundles, audit logs) imports no ML library,
so the strict parser returns NumPy arrays that are views of the decrypted
buffer, and the writer accepts NumPy arrays or, from code that trains, PyTorch
tensors (recognised by their type, without importing torch here).

bfloat16 has no NumPy dtype.  A ``BF16`` tensor is an array of
:data:`BFLOAT16`, a one-field structured dtype over the raw little-endian
``uint16`` bits: it keeps its safetensors dtype through the policy checks and
the writer, no NumPy arithmetic can silently treat the bits as integers, and
:func:`to_torch` turns it back into a ``torch.bfloat16`` tensor without a copy.
Its NaN/Inf check tests the exponent bits (all ones) of the raw ``uint16``
values.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

__all__ = ["BFLOAT16", "DTYPES", "dtype_code", "tensor_bytes", "all_finite", "to_torch"]

BFLOAT16 = np.dtype([("bfloat16", "<u2")])
"""The NumPy stand-in for safetensors ``BF16``: raw bits, 2 bytes an element."""

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": BFLOAT16,
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
"""safetensors dtype code -> NumPy dtype (little-endian, as safetensors stores data)."""

FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16"})
_TORCH_CODES = {"torch.float64": "F64", "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16",
                "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8",
                "torch.uint8": "U8", "torch.bool": "BOOL"}
_BF16_EXPONENT = 0x7F80          # all exponent bits set: Inf or NaN
_FINITE_CHUNK = 1 << 20          # elements per step of the bf16 check: a bounded temporary, whatever the tensor size


def _is_torch(tensor: Any) -> bool:
    return type(tensor).__module__.startswith("torch")


def dtype_code(tensor: Any) -> str:
    """The safetensors code of a NumPy array's or a torch tensor's dtype; its own name when it has none."""
    if _is_torch(tensor):
        return _TORCH_CODES.get(str(tensor.dtype), str(tensor.dtype))
    dtype = np.asarray(tensor).dtype if not isinstance(tensor, np.ndarray) else tensor.dtype
    for code, candidate in DTYPES.items():
        if dtype == candidate:
            return code
    return str(dtype)


def tensor_bytes(tensor: Any) -> memoryview:
    """The tensor's data as flat little-endian bytes: a view of its memory unless it is not contiguous (or on a GPU)."""
    if _is_torch(tensor):
        torch = sys.modules["torch"]   # a torch tensor exists, so torch is already imported
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)  # (numel,)
        return memoryview(flat.view(torch.uint8).numpy()).cast("B") if flat.numel() else memoryview(b"")
    array = np.ascontiguousarray(tensor)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")


def all_finite(array: np.ndarray, code: str) -> bool:
    """True when a float tensor holds no NaN or infinity (other dtypes always are finite).

    F16/F32/F64: ``min`` and ``max`` propagate NaN and expose +/-Inf, and need no
    temporary the size of the tensor (``isfinite(x).all()`` would allocate one).
    BF16: the exponent bits of the raw values, a bounded chunk at a time.
    """
    if code not in FLOAT_CODES or array.size == 0:
        return True
    flat = array.reshape(-1)
    if code == "BF16":
        bits = flat.view(np.uint16)
        return not any(np.any((bits[i : i + _FINITE_CHUNK] & _BF16_EXPONENT) == _BF16_EXPONENT)
                       for i in range(0, bits.size, _FINITE_CHUNK))
    return math.isfinite(float(flat.min())) and math.isfinite(float(flat.max()))


def to_torch(array: Any) -> Any:
    """A torch tensor sharing ``array``'s memory (BF16 included); torch tensors are returned as they are.

    For the code that trains and distils, at the boundary where received tensors enter PyTorch.
    """
    import torch

    if isinstance(array, torch.Tensor):
        return array
    if array.dtype == BFLOAT16:
        tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
    else:
        tensor = torch.from_numpy(array)
    # NumPy gives empty arrays zero strides, which some torch views refuse: an empty tensor has no memory to share.
    return tensor if tensor.numel() else torch.empty(tensor.shape, dtype=tensor.dtype)
