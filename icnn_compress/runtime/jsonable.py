"""Strict JSON from measures: NaN and infinities (an undefined measure) become ``null``."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["finite_json", "finite_or_none"]


def finite_or_none(v: Any) -> float | None:
    """``float(v)`` (a number or a one-element tensor), or None when it is NaN or infinite."""
    v = float(v)
    return v if math.isfinite(v) else None


def finite_json(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None, recursively through mappings and lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: finite_json(x) for k, x in obj.items()}
    if isinstance(obj, list):
        return [finite_json(x) for x in obj]
    return obj
