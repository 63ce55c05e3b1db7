"""The fork server's first preload: a SIGTERM does not end it.

A SIGTERM to the service's whole process group (systemd's stop, ``timeout``) reaches the fork
server too; it must outlive the workers it started, whose ends it reports to the server, and
it ends when its server has gone (``_fork_server``). It ignores SIGINT (Ctrl+C) already
(``multiprocessing.forkserver``). Each worker restores SIGTERM's default first thing.

Importing it anywhere but in the fork server's preload does nothing.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

__all__ = ["imported_by_the_fork_server"]


def imported_by_the_fork_server() -> bool:
    """Whether the fork server of ``multiprocessing.forkserver`` is importing the caller."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "main"
            and frame.f_globals.get("__name__") == "multiprocessing.forkserver"
        ):
            return True
        frame = frame.f_back
    return False


if imported_by_the_fork_server():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
