"""CPU snapshots of a trainer's state that reuse the memory of earlier snapshots.

Copying into tensors that already exist is several times faster than allocating new ones
(fresh memory is page-faulted in on first write), and the copy is all the training thread
waits for when a checkpoint is taken.
"""

from __future__ import annotations

import copy
import enum
import logging
import numbers
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["snapshot"]

logger = logging.getLogger(__name__)
_warned: set[type] = set()


def snapshot(state: Any, reuse: Any = None) -> Any:
    """A deep copy of ``state`` with every tensor on the CPU, sharing nothing with it.

    Tensors of ``reuse`` (an earlier snapshot no one uses any more) with the same place in
    the structure, shape and dtype are overwritten instead of allocating new memory.
    """
    if isinstance(state, torch.Tensor):
        source = state.detach()
        if (
            isinstance(reuse, torch.Tensor)
            and reuse.shape == source.shape
            and reuse.dtype == source.dtype
            and reuse.layout == torch.strided
            and source.layout == torch.strided
            and not source.is_quantized
            and reuse.is_contiguous()
        ):
            reuse.copy_(source)
            return reuse
        return source.to("cpu", copy=True)
    if isinstance(state, Mapping):
        previous = reuse if isinstance(reuse, Mapping) else {}
        return {key: snapshot(value, previous.get(key)) for key, value in state.items()}
    if isinstance(state, list | tuple):
        previous_items = list(reuse) if isinstance(reuse, list | tuple) else []
        items = [
            snapshot(value, previous_items[i] if i < len(previous_items) else None)
            for i, value in enumerate(state)
        ]
        return items if isinstance(state, list) else tuple(items)
    if isinstance(state, enum.Enum):
        # torch.load(weights_only=True) refuses enum classes: keep the plain value
        return snapshot(state.value)
    if state is None or type(state) in (int, float, str, bool, bytes):
        return state
    # numpy scalars and other number or string types: their plain Python value
    if isinstance(state, bool):
        return bool(state)
    if isinstance(state, numbers.Integral):
        return int(state)
    if isinstance(state, numbers.Real):
        return float(state)
    if isinstance(state, str):
        return str(state)
    if type(state) not in _warned:
        _warned.add(type(state))
        logger.warning(
            "checkpoint state holds a %s: loading it needs weights_only=False, which trainbus "
            "refuses; keep tensors, numbers, strings and containers in state dicts",
            type(state).__qualname__,
        )
    return copy.deepcopy(state)
