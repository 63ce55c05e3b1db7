"""The fork server's last preload: when the server is gone (killed, crashed) the fork server
ends at once instead of tearing down an interpreter with torch imported (seconds), so that no
process of the server outlives it. It holds nothing to flush: jobs run in its children.

It also freezes the preloaded heap (torch, trainbus: some 400,000 objects) out of the cyclic
garbage collector's reach, so that a worker's full collections walk only what its job
allocated: unfrozen, they cost a job's event loop half its CPU and its training thread 5%.

And it sets glibc's allocator to keep freed memory (up to 64 MiB at the top of a heap, and
blocks under 32 MiB out of ``mmap``): with the defaults a worker's training thread gave the
memory of each epoch's tensors back to the system and faulted it in again, 10,000 page faults
an epoch that cost a 0.5 s epoch 6% (a bare training process in its main thread takes none).

Importing it anywhere but in the fork server's preload does nothing.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import os
import sys

from ._fork_server_signals import imported_by_the_fork_server

__all__: list[str] = []


_M_TRIM_THRESHOLD = -1  # glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
TRIM_THRESHOLD_BYTES = 64 << 20
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's own ceiling for its adaptive threshold


def _exit_now() -> None:
    os._exit(0)  # the fork server exits only when its server has gone


def _keep_freed_memory() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


if imported_by_the_fork_server():
    atexit.register(_exit_now)  # the last preload: its handler runs first
    gc.collect(1)  # the young generations only: the preloads leave little garbage
    gc.freeze()  # inherited by every worker forked from here
    _keep_freed_memory()  # so are the allocator's settings
