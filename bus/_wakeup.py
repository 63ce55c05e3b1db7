"""Thread-to-event-loop wake-ups, batched: at most one pending call into the loop at a time.

anyio's ``from_thread`` helpers block the calling thread until the loop has run the call,
which costs a round trip per event. Publishing only needs "run this soon", so the notifier
uses the backend's own non-blocking primitive (``loop.call_soon_threadsafe`` on asyncio,
``TrioToken.run_sync_soon`` on trio).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import sniffio

__all__ = ["LoopNotifier"]


class LoopNotifier:
    """Schedules callbacks on the event loop it was created in, from any thread."""

    __slots__ = ("_loop_thread", "_schedule")

    def __init__(self) -> None:
        library = sniffio.current_async_library()
        self._loop_thread = threading.get_ident()
        if library == "asyncio":
            import asyncio

            self._schedule: Callable[[Callable[[], object]], object] = (
                asyncio.get_running_loop().call_soon_threadsafe
            )
        elif library == "trio":
            import trio

            self._schedule = trio.lowlevel.current_trio_token().run_sync_soon
        else:  # pragma: no cover - anyio supports only these two
            raise RuntimeError(f"unsupported async library {library!r}")

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
