"""The fork server's last preload: when the server is gone (killed, crashed) the fork server
ends at once instead of tearing down an interpreter with torch imported (seconds), so that no
process of the server outlives it. It holds nothing to flush: jobs run in its children.

Importing it anywhere but in the fork server's preload does nothing.
"""

from __future__ import annotations

import atexit
import os

from ._fork_server_signals import imported_by_the_fork_server

__all__: list[str] = []


def _exit_now() -> None:
    os._exit(0)  # the fork server exits only when its server has gone


if imported_by_the_fork_server():
    atexit.register(_exit_now)  # the last preload: its handler runs first
