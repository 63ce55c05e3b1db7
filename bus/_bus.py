"""The event bus: per-job sequencing, fan-out into subscriber buffers, batched wake-ups."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType, TracebackType
from typing import Any

import anyio
from anyio.abc import TaskGroup

from ._delivery import BusStatistics, DeliveryPolicy
from ._errors import BusClosed, BusError, WouldBlock
from ._events import Event, EventType, event_type_for, event_types
from ._log import JobLog
from ._readers import ReaderWakeUps, WaitSlot
from ._retired import EndedSubscriptions
from ._room import PublisherRoom
from ._sequences import JobLogs
from ._subscriber import AttachedSubscribers, Subscriber, SubscriberHandle
from ._subscription import Subscription, current_subscription

__all__ = ["EventBus"]


_new_event = tuple.__new__
# A publish_many this long wakes its readers at once, without a coalescing round after it:
# it is a batch already, and each further round costs the publishing thread the GIL.
_BULK = 64
_now = time.time
_BatchItem = (
    tuple[EventType | str, Mapping[str, Any]] | tuple[EventType | str, Mapping[str, Any], float]
)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class EventBus:
    """An in-process, thread-safe event bus that fans events out to async subscribers.

    Use it as an async context manager; it owns the tasks of attached subscribers::

        async with EventBus() as bus:
            bus.attach(MySubscriber())
            bus.publish("job-1", EventType.TRAIN_START, {"epochs": 3})

    :meth:`publish` may be called from any thread. Each event is appended once to its job's
    log (see ``bus/_log.py``), whatever the number of subscribers; the fast path takes one
    lock and wakes the event loop at most once per batch of events.
    """

    def __init__(
        self,
        *,
        drain_timeout: float = 10.0,
        wake_interval: float = 0.002,
        max_wake_interval: float = 0.02,
    ) -> None:
        """:param drain_timeout: seconds attached subscribers get to drain at close.
        :param wake_interval: while events keep coming from other threads, waiting
            subscribers are woken at most this often (seconds). The first event after a
            quiet spell wakes them at once.
        :param max_wake_interval: while events keep coming round after round, the interval
            doubles up to this (seconds). A publisher that has to wait for buffer room, or a
            :meth:`wait_processed` call, wakes the subscribers at once.
        """
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._wakeups = ReaderWakeUps(self._lock, wake_interval, max_wake_interval)
        self._jobs = JobLogs()
        self._logs = self._jobs.by_job  # the hot path looks a job's log up here
        self._room = PublisherRoom(self._lock, self._wakeups, self._jobs.trimmed_counts)
        self._closed = False
        self._draining = False  # closed, but subscribers may still report their errors
        self._task_group: TaskGroup | None = None
        self._attached = AttachedSubscribers(
            self._lock,
            self._wakeups,
            publish_report=self._publish_report,
            drain_timeout=lambda: self.drain_timeout,
        )
        self._ended = EndedSubscriptions(self._lock)

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> EventBus:
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._wakeups.start(self._task_group, self._jobs.published_marker)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.aclose()
        assert self._task_group is not None
        return await self._task_group.__aexit__(exc_type, exc, traceback)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def wake_interval(self) -> float:
        return self._wakeups.wake_interval

    @property
    def max_wake_interval(self) -> float:
        return self._wakeups.max_wake_interval

    async def aclose(self, timeout: float | None = None) -> None:
        """Close the bus: refuse new events, let subscribers drain, then stop their tasks.

        Lossless subscribers receive everything published before the close; attached
        subscribers get ``timeout`` seconds (default ``drain_timeout``) to handle it.
        """
        with self._lock:
            waiters: list[anyio.Event | None] = []
            if not self._closed:
                self._closed = True
                waiters.extend(s.mark_closed() for s in self._jobs.subscriptions)
                waiters.extend(self._room.close())
        for waiter in waiters:
            if waiter is not None:
                waiter.set()
        self._draining = True
        try:
            await self._attached.drain(self.drain_timeout if timeout is None else timeout)
        finally:
            self._draining = False
        self._wakeups.stop()

    # -- sequencing -------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int:
        """The ``seq`` of the last event published for ``job_id`` (0 if none)."""
        with self._lock:
            return self._jobs.last_seq(job_id)

    def restore_sequence(self, job_id: str, last_seq: int) -> None:
        """Continue ``job_id``'s numbering after ``last_seq`` (for a job restored from a store).

        :raises BusError: if events after ``last_seq`` were already published, or events of
            the job are still waiting to be read.
        """
        with self._lock:
            self._jobs.restore(job_id, last_seq)

    def forget(self, job_id: str) -> None:
        """Drop what the bus holds of ``job_id``: its seq counter and unread events."""
        with self._lock:
            if self._jobs.forget(job_id):
                self._room.freed()

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self, job_id: str, type: EventType | str, data: Mapping[str, Any] | None = None
    ) -> Event:
        """Publish an event from any thread and return it (with its ``seq``).

        From a plain thread this waits while a lossless subscriber is ``buffer_size`` events
        behind. On the event-loop thread it cannot wait without deadlocking the loop, so it
        never does (the subscriber may briefly fall further behind); use
        :meth:`publish_async` there when backpressure matters.

        ``data`` must be JSON-serialisable and must not be mutated afterwards.

        :raises BusClosed: if the bus is closed.
        :raises UnknownEventName: if ``type`` is not an event type.
        """
        if type.__class__ is not EventType:
            type = event_type_for(type)
        lock = self._lock
        lock.acquire()
        try:
            if self._closed:
                raise BusClosed("the bus is closed")
            log = self._logs.get(job_id)
            if log is None:
                log = self._jobs.start(job_id)
            if log.seq >= log.limit:
                self._room.make_room(log, wait=True, exempt=None)
            seq = log.seq = log.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            log.events.append(event)
            wakeups = self._wakeups
            wake = wakeups.waiting and wakeups.announce(_slots(log), type)
        finally:
            lock.release()
        if wake:
            wakeups.wake()
        return event

    def publish_many(
        self,
        job_id: str,
        items: Iterable[_BatchItem],
    ) -> list[Event]:
        """Publish several events of one job in order, as consecutive ``seq`` numbers, under
        one lock and with at most one wake-up (at once for 64 events or more; a smaller batch
        joins the coalescer's rounds like :meth:`publish`). Each item is ``(type, data)`` or
        ``(type, data, time)``: an item's own ``time`` says when it happened (a trainer
        publishing the batch events it buffered passes it); the others share the time of the
        call. Waits for room like :meth:`publish`, for the whole batch before its first event
        (a batch larger than a lossless subscriber's buffer waits for that buffer to empty),
        so no other publisher's event takes a ``seq`` inside it.

        :raises BusClosed: if the bus is closed.
        """
        published = self._publish_many(job_id, items, wait=True)
        assert published is not None
        return published

    def try_publish_many(self, job_id: str, items: Iterable[_BatchItem]) -> list[Event] | None:
        """:meth:`publish_many` that never waits: None (nothing published) when a lossless
        subscriber has no room for the whole batch. For the event loop's thread, which must
        not block: it tries this first and waits on a thread only when it must.

        :raises BusClosed: if the bus is closed.
        """
        return self._publish_many(job_id, items, wait=False)

    def _publish_many(
        self, job_id: str, items: Iterable[_BatchItem], *, wait: bool
    ) -> list[Event] | None:
        batch: list[_BatchItem] = items if isinstance(items, list) else list(items)
        lock = self._lock
        published: list[Event] = []
        lock.acquire()
        try:
            if self._closed:
                raise BusClosed("the bus is closed")
            log = self._logs.get(job_id)
            if log is None:
                log = self._jobs.start(job_id)
            # Room for the whole batch first: waiting halfway would let another publisher's
            # event take a seq inside it.
            if log.seq + len(batch) > log.limit:
                room = self._room.make_room(log, wait=wait, exempt=None, count=len(batch))
                if not room and not wait:
                    return None
            now = _now()
            append = log.events.append
            add = published.append
            for item in batch:
                type = item[0]
                if type.__class__ is not EventType:
                    type = event_type_for(type)
                seq = log.seq = log.seq + 1
                event = _new_event(
                    Event, (job_id, seq, type, item[2] if len(item) > 2 else now, item[1])
                )
                append(event)
                add(event)
            wakeups = self._wakeups
            wake = False
            if wakeups.waiting:
                for type in {event.type for event in published}:
                    wake = wakeups.announce(_slots(log), type) or wake
        finally:
            lock.release()
        if wake:
            wakeups.wake(coalesce=len(published) < _BULK)
        return published

    def publish_nowait(
        self, job_id: str, type: EventType | str, data: Mapping[str, Any] | None = None
    ) -> Event:
        """Publish without ever waiting.

        :raises WouldBlock: if a lossless subscriber has no room (nothing is published).
        :raises BusClosed: if the bus is closed.
        """
        event = self._try_publish(job_id, event_type_for(type), data, None)
        if event is None:
            raise WouldBlock(f"a lossless subscriber of job {job_id!r} has a full buffer")
        return event

    async def publish_async(
        self, job_id: str, type: EventType | str, data: Mapping[str, Any] | None = None
    ) -> Event:
        """Publish from async code, waiting (without blocking the loop) for buffer room.

        :raises BusClosed: if the bus is closed.
        """
        event_type = event_type_for(type)
        while True:
            waiter = anyio.Event()
            started = time.perf_counter()
            event = self._try_publish(job_id, event_type, data, waiter)
            if event is not None:
                return event
            with self._lock:
                log = self._logs.get(job_id)
                holding_back = [] if log is None else self._room.full_readers(log)
            await waiter.wait()
            waited = time.perf_counter() - started
            with self._lock:
                for subscription in holding_back:
                    subscription.add_publisher_wait(waited)

    def _try_publish(
        self,
        job_id: str,
        type: EventType,
        data: Mapping[str, Any] | None,
        waiter: anyio.Event | None,
        *,
        during_drain: bool = False,
        force: bool = False,
    ) -> Event | None:
        """Publish unless a lossless reader lacks room (then register ``waiter``, give None).

        The subscription running the calling handler is exempt: waiting for itself would
        never end. ``force`` publishes regardless of room.
        """
        me = current_subscription.get()
        with self._lock:
            if self._closed and not (during_drain and self._draining):
                raise BusClosed("the bus is closed")
            log = self._logs.get(job_id) or self._jobs.start(job_id)
            if (
                log.seq >= log.limit
                and not self._room.make_room(log, wait=False, exempt=me)
                and not force
            ):
                if waiter is not None:
                    self._room.wait_async(waiter)
                return None
            seq = log.seq = log.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            log.events.append(event)
            wakeups = self._wakeups
            wake = wakeups.waiting and wakeups.announce(_slots(log), type)
        if wake:
            wakeups.wake()
        return event

    def report_error(self, subscriber: Subscriber, job_id: str, data: Mapping[str, Any]) -> Event:
        """Report a failure an attached subscriber caught itself (a checkpoint that could not
        be written): counted in its statistics' ``errors`` like a raising handler, and
        published as a ``subscriber_error`` event of ``job_id`` with ``data``. Any thread."""
        self._attached.count_error(subscriber)
        return self.publish(job_id, EventType.SUBSCRIBER_ERROR, data)

    def _publish_report(self, job_id: str, data: Mapping[str, Any]) -> None:
        """Publish a ``subscriber_error``, also while the bus drains after being closed.

        A report never waits for room (it is published from inside a handler): a lossless
        reader may briefly fall further behind rather than an error report be lost.
        """
        self._try_publish(
            job_id, EventType.SUBSCRIBER_ERROR, data, None, during_drain=True, force=True
        )

    # -- subscribing ------------------------------------------------------------------------

    def subscribe(
        self,
        name: str,
        *,
        job_id: str | None = None,
        types: Iterable[EventType | str] | None = None,
        buffer_size: int = 1024,
        policy: DeliveryPolicy | str = DeliveryPolicy.LOSSLESS,
    ) -> Subscription:
        """Subscribe to events; every event published after this call returns is offered.

        :param name: shown in statistics and metrics.
        :param job_id: only this job's events (default: every job).
        :param types: only these event types or callback names (default: every type).
        :param buffer_size: how many events of a job the subscriber may fall behind
            before its policy applies.
        :param policy: ``lossless``, ``drop_oldest`` or ``latest``.
        :raises BusClosed: if the bus is closed.
        :raises UnknownEventName: if ``types`` names an unknown event type.
        """
        subscription = Subscription(
            name,
            job_id=job_id,
            types=event_types(types),
            buffer_size=buffer_size,
            policy=DeliveryPolicy(policy),
            lock=self._lock,
            wakeups=self._wakeups,
            room=self._room,
            on_end=self._subscription_ended,
        )
        self._wakeups.bind_loop()
        with self._lock:
            if self._closed:
                raise BusClosed("the bus is closed")
            self._jobs.add(subscription)
        return subscription

    def _subscription_ended(self, subscription: Subscription) -> None:
        """With the lock held: ``subscription`` takes no new events; its counters stay in
        the statistics until final."""
        if self._jobs.remove(subscription):
            self._ended.add(subscription)

    def attach(self, subscriber: Subscriber) -> SubscriberHandle:
        """Run ``subscriber`` in its own task on this bus until it is detached or the bus closes.

        :raises BusError: if the bus was not entered with ``async with``.
        """
        if self._task_group is None:
            raise BusError("enter the bus with 'async with EventBus() as bus' before attaching")
        subscription = self.subscribe(
            subscriber.name,
            job_id=subscriber.job_id,
            types=subscriber.subscribed_types(),
            buffer_size=subscriber.buffer_size,
            policy=subscriber.policy,
        )
        return self._attached.start(self._task_group, subscriber, subscription)

    def wait_processed(
        self, event: Event, timeout: float | None = None, *, steering_only: bool = False
    ) -> bool:
        """From a non-loop thread, wait until every attached lossless subscriber that receives
        ``event`` has handled it (with ``steering_only``, those whose ``steers_training`` is
        set). Returns False on timeout.

        Trainers use this at epoch ends so that controllers decide before the next epoch.
        """
        return self._attached.wait_processed(event, timeout, steering_only=steering_only)

    # -- introspection ----------------------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        with self._lock:
            return tuple(self._jobs.subscriptions)

    def statistics(self) -> BusStatistics:
        """A snapshot of the bus's counters and of every subscription's statistics; those of
        subscriptions that have ended are in ``retired``, summed per name."""
        subscriptions = self.subscriptions
        still_counting, retired = self._ended.statistics()
        with self._lock:
            counts = self._jobs.published_counts()
            closed = self._closed
        return BusStatistics(
            published=sum(counts.values()),
            published_by_type={t.value: n for t, n in counts.items() if n},
            subscriptions=(*(s.statistics() for s in subscriptions), *still_counting),
            closed=closed,
            retired=retired,
        )


def _slots(log: JobLog) -> Iterator[WaitSlot]:
    return (cursor.slot for cursor in log.cursors)
