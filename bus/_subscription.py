"""A subscription: one subscriber's bounded buffer, its policy, and the consuming side."""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from ._delivery import DeliveryPolicy, SubscriptionStatistics
from ._errors import WouldBlock
from ._events import Event, EventType

if TYPE_CHECKING:
    from ._bus import EventBus

__all__ = ["Subscription"]


class Subscription:
    """The receiving end of :meth:`EventBus.subscribe`.

    Use it as an async context manager (closing it unsubscribes) and consume it one event at
    a time (``async for event in subscription``, :meth:`receive`) or in batches
    (:meth:`receive_batch`). Iteration ends once the bus is closed and the buffer is drained.
    Events of each job arrive in ``seq`` order.
    """

    def __init__(
        self,
        bus: EventBus,
        name: str,
        *,
        job_id: str | None,
        types: frozenset[EventType] | None,
        buffer_size: int,
        policy: DeliveryPolicy,
    ) -> None:
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.name = name
        self.job_id = job_id
        self.types = types
        self.buffer_size = buffer_size
        self.policy = policy
        self._lossy = policy is not DeliveryPolicy.LOSSLESS
        self._bus = bus
        self._lock: threading.Lock = bus._lock
        self._items: deque[Event] = deque()
        # job_id -> [first missed seq, last missed seq, count], reported as one gap event
        self._missed: dict[str, list[int]] = {}
        self._waiter: anyio.Event | None = None
        self._wake_pending = False
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._gaps = 0
        self.errors = 0
        self._wait_seconds = 0.0

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} policy={self.policy.value} size={self.buffer_size}>"

    def matches(self, job_id: str, event_type: EventType) -> bool:
        """True when an event of ``job_id`` and ``event_type`` passes the filters."""
        return (self.job_id is None or self.job_id == job_id) and (
            self.types is None or event_type in self.types
        )

    # -- publisher side (called with the bus lock held) -------------------------------------

    def _is_full(self) -> bool:
        return len(self._items) >= self.buffer_size

    def _overflow(self) -> None:
        """Make room in a full lossy buffer (the bus appends the new event right after)."""
        items = self._items
        if self.policy is DeliveryPolicy.LATEST:
            while items:
                self._record_missed(items.popleft())
        else:
            self._record_missed(items.popleft())

    def _record_missed(self, event: Event) -> None:
        self._dropped += 1
        missed = self._missed.get(event.job_id)
        if missed is None:
            self._missed[event.job_id] = [event.seq, event.seq, 1]
        else:
            missed[1] = event.seq
            missed[2] += 1

    def _add_wait(self, seconds: float) -> None:
        self._wait_seconds += seconds

    # -- consumer side ----------------------------------------------------------------------

    def _take(self, limit: float) -> list[Event]:
        """Take up to ``limit`` events (gap notices first), with the bus lock held."""
        batch: list[Event] = []
        if self._missed:
            now = time.time()
            for job_id, (first, last, count) in self._missed.items():
                batch.append(
                    Event(
                        job_id,
                        last,
                        EventType.GAP,
                        now,
                        {
                            "from_seq": first,
                            "to_seq": last,
                            "missed": count,
                            "subscriber": self.name,
                        },
                    )
                )
            self._gaps += len(self._missed)
            self._missed.clear()
        items = self._items
        if limit >= len(items):
            batch.extend(items)
            taken = len(items)
            items.clear()
        else:
            taken = int(limit)
            for _ in range(taken):
                batch.append(items.popleft())
        self._delivered += taken
        if taken:
            self._bus._space_freed(self)
        return batch

    def receive_batch_nowait(self, max_items: int | None = None) -> list[Event]:
        """Return every buffered event (at most ``max_items``) without waiting.

        :raises WouldBlock: if nothing is buffered.
        :raises anyio.EndOfStream: if the subscription or bus is closed and drained.
        """
        with self._lock:
            if self._items or self._missed:
                return self._take(math.inf if max_items is None else max_items)
            if self._closed:
                raise anyio.EndOfStream
        raise WouldBlock

    async def receive_batch(self, max_items: int | None = None) -> list[Event]:
        """Wait for events and return every buffered one (at most ``max_items``), in order.

        :raises anyio.EndOfStream: once the subscription or bus is closed and drained.
        """
        limit = math.inf if max_items is None else max_items
        if limit < 1:
            raise ValueError("max_items must be at least 1")
        while True:
            with self._lock:
                if self._items or self._missed:
                    return self._take(limit)
                if self._closed:
                    raise anyio.EndOfStream
                waiter = self._waiter
                if waiter is None or waiter.is_set():
                    if waiter is None:
                        self._bus._waiting += 1
                    waiter = self._waiter = anyio.Event()
            await waiter.wait()

    async def receive(self) -> Event:
        """Wait for and return the next event.

        :raises anyio.EndOfStream: once the subscription or bus is closed and drained.
        """
        return (await self.receive_batch(1))[0]

    def receive_nowait(self) -> Event:
        """Return the next event without waiting.

        :raises WouldBlock: if nothing is buffered.
        :raises anyio.EndOfStream: if the subscription or bus is closed and drained.
        """
        return self.receive_batch_nowait(1)[0]

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            try:
                batch = await self.receive_batch()
            except anyio.EndOfStream:
                return
            for event in batch:
                yield event

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop receiving new events; what is buffered can still be consumed."""
        self._bus._unsubscribe(self)

    def _clear_waiter(self) -> anyio.Event | None:
        """With the bus lock held: forget the consumer's waiter and return it for waking."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not self._wake_pending:
                self._bus._waiting -= 1
        return waiter

    def _mark_closed(self) -> anyio.Event | None:
        """Mark closed with the bus lock held; returns a waiter the caller must wake."""
        self._closed = True
        return self._clear_waiter()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
        with self._lock:
            if self._items:
                self._items.clear()
                self._bus._space_freed(self)

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this subscription's counters."""
        with self._lock:
            return SubscriptionStatistics(
                name=self.name,
                policy=self.policy,
                buffer_size=self.buffer_size,
                buffered=len(self._items),
                delivered=self._delivered,
                dropped=self._dropped,
                gaps=self._gaps,
                errors=self.errors,
                publisher_wait_seconds=self._wait_seconds,
            )
