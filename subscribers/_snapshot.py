"""CPU snapshots of a trainer's state that reuse the memory of earlier snapshots.

Copying into tensors that already exist is several times faster than allocating new ones
(fresh memory is page-faulted in on first write), and the copy is all the training thread
waits for when a checkpoint is taken.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["snapshot"]


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
    if isinstance(state, int | float | str | bool | bytes) or state is None:
        return state
    return copy.deepcopy(state)
