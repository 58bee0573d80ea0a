"""JSON values a strict parser reads back: non-finite floats become ``null``."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["strict_json_values"]


def strict_json_values(value: Any) -> Any:
    """NaN/Infinity become ``null``: records are read back with a strict JSON parser that refuses them
    (an AUC is undefined on a validation slice holding one class)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_values(v) for v in value]
    return value
