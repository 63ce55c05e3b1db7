"""The event loop an SDK run keeps beside the user's training: on a daemon thread, so that a
process that exits without finishing its run is not held up by it (the run's exit hook
reports how it ended first)."""

from __future__ import annotations

import threading

import anyio
from anyio.from_thread import BlockingPortal

__all__ = ["LoopThread"]


class LoopThread:
    """An anyio event loop on a daemon thread, reached through a blocking portal."""

    def __init__(self, name: str = "trainbus-sdk") -> None:
        self._ready = threading.Event()
        self._portal: BlockingPortal | None = None
        self._thread = threading.Thread(target=anyio.run, args=(self._serve,), name=name)
        self._thread.daemon = True

    def start(self) -> BlockingPortal:
        """Start the loop; its portal."""
        self._thread.start()
        self._ready.wait()
        assert self._portal is not None
        return self._portal

    async def _serve(self) -> None:
        async with BlockingPortal() as portal:
            self._portal = portal
            self._ready.set()
            await portal.sleep_until_stopped()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop once the tasks it runs are done (cancelled after ``timeout``)."""
        portal = self._portal
        if portal is None or not self._thread.is_alive():
            return
        portal.call(portal.stop)
        self._thread.join(timeout)
