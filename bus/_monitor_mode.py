"""Whether a monitored metric improves when it falls or when it rises: one comparator for every
decision that ranks values (early stopping, LR plateaus, the best checkpoint)."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Literal

__all__ = ["MODE_BETTER", "Mode", "improves"]

Mode = Literal["min", "max"]
"""``min``: lower is better (a loss); ``max``: higher is better (an accuracy)."""

MODE_BETTER: dict[Mode, Callable[[float, float], bool]] = {"min": operator.lt, "max": operator.gt}
"""The strict "is better than" of each mode (Lightning's ``mode_dict``)."""


def improves(value: float, reference: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """True when a finite ``value`` beats ``reference`` by more than ``min_delta`` (None: any
    finite value does)."""
    if not math.isfinite(value):
        return False
    if reference is None:
        return True
    margin = -min_delta if mode == "min" else min_delta
    return MODE_BETTER[mode](value, reference + margin)
