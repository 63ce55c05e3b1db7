"""The fork server's last preload: when the server is gone (killed, crashed) the fork server
ends at once instead of tearing down an interpreter with torch imported (seconds), so that no
process of the server outlives it. It holds nothing to flush: jobs run in its children.

It also freezes the preloaded heap (torch, trainbus: some 400,000 objects) out of the cyclic
garbage collector's reach, so that a worker's full collections walk only what its job
allocated: unfrozen, they cost a job's event loop half its CPU and its training thread 5%.

Importing it anywhere but in the fork server's preload does nothing.
"""

from __future__ import annotations

import atexit
import gc
import os

from ._fork_server_signals import imported_by_the_fork_server

__all__: list[str] = []


def _exit_now() -> None:
    os._exit(0)  # the fork server exits only when its server has gone


if imported_by_the_fork_server():
    atexit.register(_exit_now)  # the last preload: its handler runs first
    gc.collect(1)  # the young generations only: the preloads leave little garbage
    gc.freeze()  # inherited by every worker forked from here
