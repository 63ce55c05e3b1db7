"""Lossless backpressure: publishers that wait for buffer room, and what their wait costs.

The slow path of publishing comes here with the bus lock held, which this object shares: it
trims the job's log and, while a lossless reader has no room, makes a plain thread wait
(the event-loop thread never waits: it would deadlock the loop).
"""

from __future__ import annotations

import threading
import time
from collections import Counter

import anyio

from ._errors import BusClosed
from ._events import EventType
from ._log import JobLog
from ._readers import ReaderWakeUps
from ._subscription import Subscription

__all__ = ["PublisherRoom"]


class PublisherRoom:
    """Where publishers wait for lossless readers to make room; readers call :meth:`freed`."""

    def __init__(
        self, lock: threading.Lock, wakeups: ReaderWakeUps, trimmed_counts: Counter[EventType]
    ) -> None:
        self.closed = False
        self._space = threading.Condition(lock)
        self._wakeups = wakeups
        self._trimmed_counts = trimmed_counts  # types of the events trimmed from the logs
        self._async_waiters: list[anyio.Event] = []

    def make_room(
        self, log: JobLog, *, wait: bool, exempt: Subscription | None, count: int = 1
    ) -> bool:
        """With the lock held: trim ``log`` and apply lossless backpressure. True when the
        next ``count`` events fit (see ``JobLog.has_room``); with ``wait``, a plain thread
        waits for that. ``exempt`` never holds a publisher back.

        :raises BusClosed: if the bus closes while this waits.
        """
        log.skip_filtered()
        log.trim(self._trimmed_counts)
        log.refresh_limit()
        if log.has_room(count, exempt):
            return True
        wakeups = self._wakeups
        if not wait or wakeups.in_loop_thread():
            return False
        started = time.perf_counter()
        holding_back: set[Subscription] = set()
        wakeups.blocked_publishers += 1
        wakeups.wake_before_waiting(cursor.slot for cursor in log.cursors)
        try:
            while not log.has_room(count):
                if self.closed:
                    raise BusClosed("the bus was closed while waiting for buffer room")
                holding_back.update(self.full_readers(log))
                self._space.wait(timeout=1.0)
        finally:
            wakeups.blocked_publishers -= 1
            waited = time.perf_counter() - started
            for subscription in holding_back:
                subscription.add_publisher_wait(waited)
        log.trim(self._trimmed_counts)
        log.refresh_limit()
        return True

    def wait_async(self, waiter: anyio.Event) -> None:
        """With the lock held: set ``waiter`` once a lossless reader makes room."""
        self._async_waiters.append(waiter)

    @staticmethod
    def full_readers(log: JobLog) -> list[Subscription]:
        """With the lock held: the lossless readers of ``log`` that have no room."""
        return [
            cursor.subscription
            for cursor in log.cursors
            if not cursor.lossy
            and cursor.end_seq is None
            and cursor.backlog() >= cursor.buffer_size
        ]

    def freed(self) -> None:
        """With the lock held: a lossless reader moved on (or left); waiting publishers retry."""
        if self._wakeups.blocked_publishers:
            self._space.notify_all()
        if self._async_waiters:
            waiters, self._async_waiters = self._async_waiters, []
            for waiter in waiters:
                waiter.set()

    def close(self) -> list[anyio.Event]:
        """With the lock held: refuse further waits; returns async waiters for the caller
        to set once it has released the lock."""
        self.closed = True
        self._space.notify_all()
        waiters, self._async_waiters = self._async_waiters, []
        return waiters
