"""``torch_threads``: a process-wide setting that jobs ask for one at a time.

``torch.set_num_threads`` sizes the one intra-op thread pool of the process, so jobs that
train at once cannot each have their own. The value in force is predictable: that of the
most recently started job still running that asked for one, else the value the process had
before any job asked. A job that ends hands the setting back accordingly.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["torch_threads"]

_lock = threading.Lock()
_requests: dict[int, int] = {}  # a running job's turn -> the threads it asked for
_turns = itertools.count()
_before = torch.get_num_threads()


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads(count)`` for the body (None: leave the setting alone)."""
    global _before
    if count is None:
        yield
        return
    turn = next(_turns)
    with _lock:
        if not _requests:
            _before = torch.get_num_threads()
        _requests[turn] = count
        torch.set_num_threads(count)
    try:
        yield
    finally:
        with _lock:
            del _requests[turn]
            torch.set_num_threads(next(reversed(_requests.values()), _before))
