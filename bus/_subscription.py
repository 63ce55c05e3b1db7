"""A subscription: one subscriber's cursors into the job logs, its policy, and its reading side."""

from __future__ import annotations

import contextvars
import math
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TYPE_CHECKING

import anyio

from ._delivery import DeliveryPolicy, SubscriptionStatistics
from ._errors import WouldBlock
from ._events import Event, EventType
from ._log import Cursor, JobLog
from ._readers import ReaderWakeUps, WaitSlot

if TYPE_CHECKING:
    from ._room import PublisherRoom

__all__ = ["Subscription", "current_subscription"]


# The subscription whose handler is running in this task. A subscriber that publishes into
# its own full lossless buffer would wait for itself forever; its own buffer may overflow.
current_subscription: contextvars.ContextVar[Subscription | None] = contextvars.ContextVar(
    "trainbus_current_subscription", default=None
)


class Subscription:
    """The receiving end of :meth:`EventBus.subscribe`.

    Use it as an async context manager (closing it unsubscribes) and consume it one event at
    a time (``async for event in subscription``, :meth:`receive`) or in batches
    (:meth:`receive_batch`). Iteration ends once the subscription or the bus is closed and
    everything buffered has been read. Events of each job arrive in ``seq`` order; a lossy
    subscription receives a ``gap`` event (``seq`` = the last missed one) before the first
    event after a hole; the gap is one of the items a read returns.

    ``buffer_size`` bounds how far, in events of a job that pass its filters, the
    subscription may fall behind the publishers: a lossless one holds them back, a lossy one
    loses its oldest, and its gaps count only missed events of its own types.
    """

    def __init__(
        self,
        name: str,
        *,
        job_id: str | None,
        types: frozenset[EventType] | None,
        buffer_size: int,
        policy: DeliveryPolicy,
        lock: threading.Lock,
        wakeups: ReaderWakeUps,
        room: PublisherRoom,
        on_end: Callable[[Subscription], None],
    ) -> None:
        """Made by :meth:`EventBus.subscribe`, which shares its ``lock``, ``wakeups`` and
        ``room``; ``on_end`` is called with the lock held when the subscription ends."""
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        self.name = name
        self.job_id = job_id
        self.types = types
        self.buffer_size = buffer_size
        self.policy = policy
        self._lossy = policy is not DeliveryPolicy.LOSSLESS
        self._lock = lock
        self._wakeups = wakeups
        self._room = room
        self._on_end = on_end
        self.wait_slot = WaitSlot(types)
        self._cursors: dict[str, Cursor] = {}
        self._closed = False
        self._delivered = 0
        self._dropped = 0
        self._gaps = 0
        self.errors = 0
        self._wait_seconds = 0.0
        self.consumer_running = False
        """True while an attached subscriber's task may still count into this subscription."""
        self.taken: dict[str, int] = {}
        """Per job, the last ``seq`` the latest read moved past (handled once its batch is)."""

    def __repr__(self) -> str:
        return f"<Subscription {self.name!r} policy={self.policy.value} size={self.buffer_size}>"

    def matches(self, job_id: str, event_type: EventType) -> bool:
        """True when an event of ``job_id`` and ``event_type`` passes the filters."""
        return (self.job_id is None or self.job_id == job_id) and (
            self.types is None or event_type in self.types
        )

    # -- bookkeeping (the bus lock is held) -------------------------------------------------

    def follow(self, log: JobLog) -> None:
        if log.job_id not in self._cursors:
            cursor = Cursor(self, log)
            self._cursors[log.job_id] = cursor
            log.cursors.append(cursor)

    def unfollow(self, job_id: str) -> None:
        cursor = self._cursors.pop(job_id, None)
        if cursor is not None and cursor in cursor.log.cursors:
            cursor.log.cursors.remove(cursor)

    def _has_pending(self) -> bool:
        return any(cursor.has_unread() for cursor in self._cursors.values())

    def _defer_for_round(self, limit: float) -> anyio.Event | None:
        """With the lock held: when a gathering reader should wait for the next wake-up
        round, queue it for that round and return the event to wait on."""
        if self._closed or not self._wakeups.round_coming(self.wait_slot):
            return None
        backlog = 0
        for cursor in self._cursors.values():
            cursor.skip_filtered()  # count only what this reader will be handed
            backlog += cursor.unread()
        if backlog == 0 or backlog >= limit:
            return None
        return self._wakeups.queue_for_round(self.wait_slot)

    def add_publisher_wait(self, seconds: float) -> None:
        """With the lock held: count time a publisher waited for room in this buffer."""
        self._wait_seconds += seconds

    def _take(self, limit: float) -> list[Event]:
        """Read up to ``limit`` items (a ``gap`` counts as one), with the bus lock held."""
        batch: list[Event] = []
        taken = self.taken = {}
        advanced_lossless = False
        for cursor in list(self._cursors.values()):
            if not cursor.has_unread():
                if cursor.end_seq is not None:  # closed and drained: stop holding the log
                    self.unfollow(cursor.log.job_id)
                continue
            events = cursor.log.read(cursor, limit - len(batch))
            if events:
                delivered = len(events)
                if events[0].type is EventType.GAP:
                    self._gaps += 1
                    self._dropped += events[0].data["missed"]
                    delivered -= 1
                self._delivered += delivered
                batch.extend(events)
            spill = cursor.spill
            taken[cursor.log.job_id] = spill[0].seq - 1 if spill else cursor.next_seq - 1
            advanced_lossless = advanced_lossless or not self._lossy
            if cursor.end_seq is not None and not cursor.has_unread():
                self.unfollow(cursor.log.job_id)
            if len(batch) >= limit:
                break
        if advanced_lossless:
            self._room.freed()
        return batch

    # -- reading ----------------------------------------------------------------------------

    def receive_batch_nowait(self, max_items: int | None = None) -> list[Event]:
        """Return every buffered event (at most ``max_items``) without waiting.

        :raises WouldBlock: if nothing is buffered.
        :raises anyio.EndOfStream: if the subscription or bus is closed and drained.
        """
        with self._lock:
            if self._has_pending():
                batch = self._take(math.inf if max_items is None else max_items)
                if batch:
                    return batch
            if self._closed:
                raise anyio.EndOfStream
        raise WouldBlock

    async def receive_batch(
        self, max_items: int | None = None, *, gather: bool = False
    ) -> list[Event]:
        """Wait for events and return every buffered one (at most ``max_items``), in order.

        :param gather: while publishers keep the bus busy, wait for its next wake-up round
            (at most ``max_wake_interval``) instead of returning the few events buffered
            now, unless ``max_items`` are buffered already: a consumer that pays per batch
            (a transaction, a thread hand-over) then handles fewer, fuller batches. A thread
            in :meth:`EventBus.wait_processed` or a publisher waiting for room ends the wait.
        :raises anyio.EndOfStream: once the subscription or bus is closed and drained.
        """
        limit = math.inf if max_items is None else max_items
        if limit < 1:
            raise ValueError("max_items must be at least 1")
        while True:
            with self._lock:
                waiter = self._defer_for_round(limit) if gather else None
                if waiter is not None:
                    gather = False  # once: after the round, take what is there
                else:
                    if self._has_pending():
                        batch = self._take(limit)
                        if batch:
                            return batch
                    if self._closed:
                        raise anyio.EndOfStream
                    waiter = self._wakeups.waiter_for(self.wait_slot)
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

    @property
    def finished(self) -> bool:
        """Closed, drained and without a running consumer: its counters can no longer change."""
        with self._lock:
            return (
                self._closed
                and not self.consumer_running
                and not any(cursor.has_unread() for cursor in self._cursors.values())
            )

    def close(self) -> None:
        """Stop receiving new events; what is already buffered can still be read."""
        self._end(keep_buffered=True)

    def _end(self, *, keep_buffered: bool) -> None:
        with self._lock:
            self._on_end(self)
            for job_id, cursor in list(self._cursors.items()):
                if keep_buffered and cursor.has_unread():
                    cursor.end_seq = cursor.log.seq
                else:
                    self.unfollow(job_id)
                cursor.log.refresh_limit()
            waiter = self.mark_closed()
            self._room.freed()
        if waiter is not None:
            waiter.set()

    def mark_closed(self) -> anyio.Event | None:
        """Mark closed with the lock held; returns a waiter the caller must set."""
        self._closed = True
        return self._wakeups.release(self.wait_slot)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._end(keep_buffered=False)

    def statistics(self) -> SubscriptionStatistics:
        """A snapshot of this subscription's counters."""
        with self._lock:
            buffered = 0
            pending_drops = 0
            for cursor in self._cursors.values():
                buffered += cursor.buffered()
                if self._lossy:
                    pending_drops += cursor.missed + cursor.overflow()
            return SubscriptionStatistics(
                name=self.name,
                policy=self.policy,
                buffer_size=self.buffer_size,
                buffered=buffered,
                delivered=self._delivered,
                dropped=self._dropped + pending_drops,
                gaps=self._gaps,
                errors=self.errors,
                publisher_wait_seconds=self._wait_seconds,
            )
