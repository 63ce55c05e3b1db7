"""Thread-to-event-loop wake-ups, batched: at most one pending call into the loop at a time.

anyio's ``from_thread`` helpers block the calling thread until the loop has run the call,
which costs a round trip per event. Publishing only needs "run this soon", so the notifier
uses the backend's own non-blocking primitive (``loop.call_soon_threadsafe`` on asyncio,
``TrioToken.run_sync_soon`` on trio).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

from anyio.lowlevel import current_token

__all__ = ["LoopNotifier"]


class LoopNotifier:
    """Schedules callbacks on the event loop it was created in, from any thread."""

    __slots__ = ("_loop_thread", "_schedule")

    def __init__(self) -> None:
        # anyio's token holds the backend's own handle: the asyncio loop, or trio's TrioToken.
        native = current_token().native_token
        self._loop_thread = threading.get_ident()
        self._schedule: Callable[[Callable[[], object]], object]
        if isinstance(native, asyncio.AbstractEventLoop):
            self._schedule = native.call_soon_threadsafe
        else:
            self._schedule = native.run_sync_soon  # type: ignore[attr-defined]

    def in_loop_thread(self) -> bool:
        """True when called from the thread that runs the event loop."""
        return threading.get_ident() == self._loop_thread

    def call_soon(self, callback: Callable[[], object]) -> bool:
        """Run ``callback`` on the loop soon; False if the loop has already stopped."""
        try:
            self._schedule(callback)
        except RuntimeError:
            return False
        return True
