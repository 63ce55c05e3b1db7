"""The event bus: per-job sequencing, fan-out into subscriber buffers, batched wake-ups."""

from __future__ import annotations

import contextvars
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import replace
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._delivery import BusStatistics, DeliveryPolicy, SubscriptionStatistics
from ._errors import BusClosed, BusError, WouldBlock
from ._events import Event, EventType, event_type_for, event_types
from ._log import JobLog
from ._subscription import Subscription
from ._wakeup import LoopNotifier

if TYPE_CHECKING:
    from ._subscriber import Subscriber, SubscriberHandle

__all__ = ["EventBus"]


_new_event = tuple.__new__
_BULK = 64
"""A ``publish_many`` of this many events wakes its readers at once, without a coalescing
round after it: it is a batch already (a trainer's 0.1 s of batch events), and each further
round costs the loop thread the GIL, which the publishing training thread pays for. With four
lossless readers this took a tiny training run from 71 to 43 loop rounds and its overhead
from ~2.4% to ~1.0% (bench/overhead.py's workload, fastest of 15)."""
_now = time.time
_BatchItem = (
    tuple[EventType | str, Mapping[str, Any]] | tuple[EventType | str, Mapping[str, Any], float]
)
_EMPTY: Mapping[str, Any] = MappingProxyType({})


# The subscription whose handler is running in this task. A subscriber that publishes into
# its own full lossless buffer would wait for itself forever; its own buffer may overflow.
current_subscription: contextvars.ContextVar[Subscription | None] = contextvars.ContextVar(
    "trainbus_current_subscription", default=None
)


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
        self.wake_interval = wake_interval
        self.max_wake_interval = max(wake_interval, max_wake_interval)
        self._quiet_signal: anyio.Event | None = None
        self._coalescer: anyio.CancelScope | None = None
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._subscriptions: list[Subscription] = []
        self._logs: dict[str, JobLog] = {}
        self._trimmed_counts: Counter[EventType] = Counter()
        self._closed = False
        self._draining = False  # closed, but subscribers may still report their errors
        self._notifier: LoopNotifier | None = None
        self._waiting = 0  # consumers waiting for events and not yet queued for a wake-up
        self._pending_wake: list[Subscription] = []
        self._wake_scheduled = False
        self._blocked_publishers = 0
        self._processed_waiters = 0  # threads in wait_processed: gathering readers take now
        self._async_space_waiters: list[anyio.Event] = []
        self._task_group: TaskGroup | None = None
        self._handles: list[SubscriberHandle] = []
        # Subscriptions that ended count on in statistics until their counters are final, then
        # fold into per-name totals: a per-job subscriber's counters never fall back.
        self._ended: list[Subscription] = []
        self._retired: dict[str, SubscriptionStatistics] = {}

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> EventBus:
        self._notifier = LoopNotifier()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        self._quiet_signal = anyio.Event()
        self._coalescer = anyio.CancelScope()
        self._task_group.start_soon(self._coalesce_wakeups, name="bus wake-ups")
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

    async def aclose(self, timeout: float | None = None) -> None:
        """Close the bus: refuse new events, let subscribers drain, then stop their tasks.

        Lossless subscribers receive everything published before the close; attached
        subscribers get ``timeout`` seconds (default ``drain_timeout``) to handle it.
        """
        with self._lock:
            waiters: list[anyio.Event | None] = []
            if not self._closed:
                self._closed = True
                waiters.extend(s._mark_closed() for s in self._subscriptions)
                self._space.notify_all()
                waiters.extend(self._async_space_waiters)
                self._async_space_waiters = []
        for waiter in waiters:
            if waiter is not None:
                waiter.set()
        self._draining = True
        try:
            with anyio.move_on_after(self.drain_timeout if timeout is None else timeout):
                for handle in list(self._handles):
                    await handle.finished.wait()
        finally:
            self._draining = False
        # Cancel only the subscriber tasks that did not drain in time: the task group's own
        # scope also encloses the body of ``async with EventBus()``.
        for handle in list(self._handles):
            handle.cancel_scope.cancel()
        if self._coalescer is not None:
            self._coalescer.cancel()

    # -- sequencing -------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int:
        """The ``seq`` of the last event published for ``job_id`` (0 if none)."""
        with self._lock:
            log = self._logs.get(job_id)
            return 0 if log is None else log.seq

    def restore_sequence(self, job_id: str, last_seq: int) -> None:
        """Continue ``job_id``'s numbering after ``last_seq`` (for a job restored from a store).

        :raises BusError: if events after ``last_seq`` were already published, or events of
            the job are still waiting to be read.
        """
        with self._lock:
            log = self._logs.get(job_id) or self._new_log(job_id)
            if last_seq < log.seq:
                raise BusError(
                    f"cannot move job {job_id!r} back to seq {last_seq}: "
                    f"seq {log.seq} was already published"
                )
            log.trim(self._trimmed_counts)
            if log.has_unread():
                raise BusError(f"cannot renumber job {job_id!r} while its events are unread")
            log.seq = last_seq
            log.base = last_seq + 1
            for cursor in log.cursors:
                cursor.next_seq = last_seq + 1
            log.refresh_limit()

    def forget(self, job_id: str) -> None:
        """Drop what the bus holds of ``job_id``: its seq counter and unread events."""
        with self._lock:
            log = self._logs.pop(job_id, None)
            if log is None:
                return
            self._trimmed_counts.update(event.type for event in log.events)
            for cursor in list(log.cursors):
                cursor.subscription._unfollow(job_id)
            self._space.notify_all()

    def _new_log(self, job_id: str) -> JobLog:
        """With the lock held: start ``job_id``'s log, followed by every matching subscription."""
        log = self._logs[job_id] = JobLog(job_id)
        for subscription in self._subscriptions:
            if subscription.job_id is None or subscription.job_id == job_id:
                subscription._follow(log)
        log.refresh_limit()
        return log

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
                log = self._new_log(job_id)
            if log.seq >= log.limit:
                self._make_room(log, wait=True, exempt=None)
            seq = log.seq = log.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            log.events.append(event)
            wake = self._waiting and self._collect_wake(log, type)
        finally:
            lock.release()
        if wake:
            self._schedule_wake()
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
        batch: list[_BatchItem] = items if isinstance(items, list) else list(items)
        lock = self._lock
        published: list[Event] = []
        lock.acquire()
        try:
            if self._closed:
                raise BusClosed("the bus is closed")
            log = self._logs.get(job_id)
            if log is None:
                log = self._new_log(job_id)
            # Room for the whole batch first: waiting halfway would let another publisher's
            # event take a seq inside it.
            if log.seq + len(batch) > log.limit:
                self._make_room(log, wait=True, exempt=None, count=len(batch))
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
            wake = False
            if self._waiting:
                for type in {event.type for event in published}:
                    wake = self._collect_wake(log, type) or wake
        finally:
            lock.release()
        if wake:
            self._schedule_wake(coalesce=len(published) < _BULK)
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
                holding_back = [] if log is None else self._full_readers(log)
            await waiter.wait()
            self._charge_wait(holding_back, time.perf_counter() - started)

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
            log = self._logs.get(job_id) or self._new_log(job_id)
            if (
                log.seq >= log.limit
                and not self._make_room(log, wait=False, exempt=me)
                and not force
            ):
                if waiter is not None:
                    self._async_space_waiters.append(waiter)
                return None
            seq = log.seq = log.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            log.events.append(event)
            wake = self._waiting and self._collect_wake(log, type)
        if wake:
            self._schedule_wake()
        return event

    def report_error(self, subscriber: Subscriber, job_id: str, data: Mapping[str, Any]) -> Event:
        """Report a failure an attached subscriber caught itself (a checkpoint that could not
        be written): counted in its statistics' ``errors`` like a raising handler, and
        published as a ``subscriber_error`` event of ``job_id`` with ``data``. Any thread."""
        for handle in list(self._handles):
            if handle.subscriber is subscriber:
                handle.subscription.errors += 1
        return self.publish(job_id, EventType.SUBSCRIBER_ERROR, data)

    def _publish_report(self, job_id: str, data: Mapping[str, Any]) -> None:
        """Publish a ``subscriber_error``, also while the bus drains after being closed.

        A report never waits for room (it is published from inside a handler): a lossless
        reader may briefly fall further behind rather than an error report be lost.
        """
        self._try_publish(
            job_id, EventType.SUBSCRIBER_ERROR, data, None, during_drain=True, force=True
        )

    def _make_room(
        self, log: JobLog, *, wait: bool, exempt: Subscription | None, count: int = 1
    ) -> bool:
        """With the lock held (the slow path): trim ``log`` and apply lossless backpressure.

        Returns True when the next ``count`` events fit (see ``JobLog.has_room``). With
        ``wait``, a plain thread waits for room; the event-loop thread never waits.
        """
        log.skip_filtered()
        log.trim(self._trimmed_counts)
        log.refresh_limit()
        if log.has_room(count, exempt):
            return True
        if not wait or (self._notifier is not None and self._notifier.in_loop_thread()):
            return False
        started = time.perf_counter()
        holding_back: set[Subscription] = set()
        self._blocked_publishers += 1
        self._wake_readers_now(log)
        try:
            while not log.has_room(count):
                if self._closed:
                    raise BusClosed("the bus was closed while waiting for buffer room")
                holding_back.update(self._full_readers(log))
                self._space.wait(timeout=1.0)
        finally:
            self._blocked_publishers -= 1
            waited = time.perf_counter() - started
            for subscription in holding_back:
                subscription._add_wait(waited)
        log.trim(self._trimmed_counts)
        log.refresh_limit()
        return True

    @staticmethod
    def _full_readers(log: JobLog) -> list[Subscription]:
        """The lossless readers of ``log`` that have no room for its next event."""
        return [
            cursor.subscription
            for cursor in log.cursors
            if not cursor.subscription._lossy
            and cursor.end_seq is None
            and cursor.backlog() >= cursor.subscription.buffer_size
        ]

    def _charge_wait(self, subscriptions: list[Subscription], seconds: float) -> None:
        with self._lock:
            for subscription in subscriptions:
                subscription._add_wait(seconds)

    def _collect_wake(self, log: JobLog, event_type: EventType | None) -> bool:
        """With the lock held: queue waiting readers of ``log`` that want ``event_type``
        (None: every waiting reader); True to schedule a wake.

        ``_waiting`` counts consumers that wait and are not queued yet, so once they are
        queued, further publishes skip this until a consumer waits again. A reader whose
        filter skips ``event_type`` is not woken for it: the slow path of publishing moves
        its cursor past such events (``JobLog.skip_filtered``) without a wake-up.
        """
        for cursor in log.cursors:
            subscription = cursor.subscription
            types = subscription.types
            if (
                subscription._waiter is not None
                and not subscription._wake_pending
                and (types is None or event_type is None or event_type in types)
            ):
                subscription._wake_pending = True
                self._waiting -= 1
                self._pending_wake.append(subscription)
        if self._pending_wake and not self._wake_scheduled:
            self._wake_scheduled = True
            return True
        return False

    # -- wake-ups ---------------------------------------------------------------------------

    def _schedule_wake(self, *, coalesce: bool = True) -> None:
        """Wake the queued readers: from another thread through the coalescer (which gathers
        what follows into rounds), or at once without ``coalesce``."""
        notifier = self._notifier
        if notifier is not None and notifier.in_loop_thread():
            self._wake_waiters()
            return
        callback = (
            self._wake_from_thread
            if coalesce and self._quiet_signal is not None
            else self._wake_waiters
        )
        if notifier is None or not notifier.call_soon(callback):
            with self._lock:
                self._wake_scheduled = False

    def _wake_from_thread(self) -> None:
        """On the loop: wake who waits now, then let the coalescer batch further wake-ups.

        Every wake-up of the loop from a publishing thread costs a trip through the loop and
        a GIL hand-over that stalls the training thread; with wake-ups at most every
        ``wake_interval`` a training loop publishing per batch measured ~1.7x slower with
        four subscribers attached without this and ~1.0x with it (bench/overhead.py).
        """
        self._wake_waiters(keep_scheduled=True)
        assert self._quiet_signal is not None
        self._quiet_signal.set()

    async def _coalesce_wakeups(self) -> None:
        """While events keep coming, wake waiting subscribers once per interval, doubling the
        interval each busy round (up to ``max_wake_interval``): each round costs every woken
        subscriber a task switch, and the loop thread the GIL, that a publishing training
        thread pays for. Backpressure and :meth:`wait_processed` do not wait for a round."""
        assert self._coalescer is not None
        with self._coalescer:
            while True:
                assert self._quiet_signal is not None
                await self._quiet_signal.wait()
                self._quiet_signal = anyio.Event()
                interval = self.wake_interval
                published = self._published_marker()
                while True:
                    await anyio.sleep(interval)
                    with self._lock:
                        if not self._pending_wake:
                            # Nobody to wake; the spell goes on while events keep coming
                            # (readers busy handling a batch gather the next at a round).
                            marker, published = published, self._published_marker()
                            if marker == published:
                                self._wake_scheduled = False
                                break
                            continue
                        published = self._published_marker()
                    self._wake_waiters(keep_scheduled=True)
                    interval = min(interval * 2, self.max_wake_interval)

    def _published_marker(self) -> int:
        """With the lock held: a number that changes whenever an event is published."""
        return sum(log.seq for log in self._logs.values())

    def _wake_readers_now(self, log: JobLog) -> None:
        """With the lock held, before a publisher waits for room: wake the readers of ``log``
        now, not at the coalescer's next round (``publish_many`` may have appended events it
        has not announced yet)."""
        if not (self._waiting and self._collect_wake(log, None)):
            self._hurry()
            return
        notifier = self._notifier  # _collect_wake handed the scheduling of a wake-up to us
        callback = self._wake_from_thread if self._quiet_signal is not None else self._wake_waiters
        if notifier is None or not notifier.call_soon(callback):
            self._wake_scheduled = False

    def _hurry(self) -> None:
        """With the lock held: wake the queued subscribers now, not at the coalescer's next
        round (someone waits for them)."""
        if self._pending_wake and self._notifier is not None:
            self._notifier.call_soon(self._wake_queued)

    def _wake_queued(self) -> None:
        self._wake_waiters(keep_scheduled=True)

    def _wake_waiters(self, *, keep_scheduled: bool = False) -> None:
        with self._lock:
            pending, self._pending_wake = self._pending_wake, []
            if not keep_scheduled:
                self._wake_scheduled = False
            waiters = []
            for subscription in pending:
                waiter = subscription._clear_waiter()  # queued: not counted in _waiting
                subscription._wake_pending = False
                if waiter is not None:
                    waiters.append(waiter)
        for waiter in waiters:
            waiter.set()

    def _space_freed(self, subscription: Subscription) -> None:
        """Called with the lock held when a lossless reader moved on."""
        if self._blocked_publishers:
            self._space.notify_all()
        if self._async_space_waiters:
            waiters, self._async_space_waiters = self._async_space_waiters, []
            for waiter in waiters:
                waiter.set()

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
            self,
            name,
            job_id=job_id,
            types=event_types(types),
            buffer_size=buffer_size,
            policy=DeliveryPolicy(policy),
        )
        if self._notifier is None:
            self._notifier = LoopNotifier()
        with self._lock:
            if self._closed:
                raise BusClosed("the bus is closed")
            self._subscriptions.append(subscription)
            if job_id is None:
                logs = list(self._logs.values())
            else:
                logs = [self._logs.get(job_id) or self._new_log(job_id)]
            for log in logs:
                subscription._follow(log)
                log.refresh_limit()
        return subscription

    def _unsubscribe(self, subscription: Subscription, *, keep_buffered: bool) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
                self._ended.append(subscription)
            for job_id, cursor in list(subscription._cursors.items()):
                if keep_buffered and cursor.has_unread():
                    cursor.end_seq = cursor.log.seq
                else:
                    subscription._unfollow(job_id)
                cursor.log.refresh_limit()
            waiter = subscription._mark_closed()
            self._space_freed(subscription)
        if waiter is not None:
            waiter.set()

    def attach(self, subscriber: Subscriber) -> SubscriberHandle:
        """Run ``subscriber`` in its own task on this bus until it is detached or the bus closes.

        :raises BusError: if the bus was not entered with ``async with``.
        """
        from ._subscriber import SubscriberHandle, run_subscriber

        if self._task_group is None:
            raise BusError("enter the bus with 'async with EventBus() as bus' before attaching")
        subscription = self.subscribe(
            subscriber.name,
            job_id=subscriber.job_id,
            types=subscriber.subscribed_types(),
            buffer_size=subscriber.buffer_size,
            policy=subscriber.policy,
        )
        subscription.consumer_running = True
        handle = SubscriberHandle(subscriber, subscription)
        self._handles.append(handle)
        self._task_group.start_soon(
            run_subscriber, self, handle, name=f"subscriber {subscriber.name}"
        )
        return handle

    def _handle_finished(self, handle: SubscriberHandle) -> None:
        if handle in self._handles:
            self._handles.remove(handle)

    def wait_processed(
        self, event: Event, timeout: float | None = None, *, steering_only: bool = False
    ) -> bool:
        """From a non-loop thread, wait until every attached lossless subscriber that receives
        ``event`` has handled it (with ``steering_only``, those whose ``steers_training`` is
        set). Returns False on timeout.

        Trainers use this at epoch ends so that controllers decide before the next epoch.
        """
        handles = [
            h
            for h in list(self._handles)
            if h.subscription.policy is DeliveryPolicy.LOSSLESS
            and h.subscription.matches(event.job_id, event.type)
            and (h.subscriber.steers_training or not steering_only)
        ]
        if not handles:
            return True
        with self._lock:
            self._processed_waiters += 1
            self._hurry()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for handle in handles:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not handle.wait_processed(event.job_id, event.seq, remaining):
                    return False
            return True
        finally:
            with self._lock:
                self._processed_waiters -= 1

    # -- introspection ----------------------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        with self._lock:
            return tuple(self._subscriptions)

    def statistics(self) -> BusStatistics:
        """A snapshot of the bus's counters and of every subscription's statistics; those of
        subscriptions that have ended are in ``retired``, summed per name."""
        subscriptions = self.subscriptions
        with self._lock:
            ended = list(self._ended)
        still_counting: list[SubscriptionStatistics] = []
        for subscription in ended:
            done = subscription.finished  # first: statistics taken after it are final
            snapshot = subscription.statistics()
            if not done:
                still_counting.append(snapshot)
                continue
            with self._lock:
                self._ended.remove(subscription)
            self._retired[snapshot.name] = _summed(self._retired.get(snapshot.name), snapshot)
        with self._lock:
            counts = Counter(self._trimmed_counts)
            for log in self._logs.values():
                counts.update(event.type for event in log.events)
            closed = self._closed
        return BusStatistics(
            published=sum(counts.values()),
            published_by_type={t.value: n for t, n in counts.items() if n},
            subscriptions=(*(s.statistics() for s in subscriptions), *still_counting),
            closed=closed,
            retired=tuple(self._retired.values()),
        )


def _summed(
    total: SubscriptionStatistics | None, ended: SubscriptionStatistics
) -> SubscriptionStatistics:
    """``ended``'s final counters added to ``total`` (nothing stays buffered in either)."""
    if total is None:
        return replace(ended, buffered=0)
    return replace(
        total,
        delivered=total.delivered + ended.delivered,
        dropped=total.dropped + ended.dropped,
        gaps=total.gaps + ended.gaps,
        errors=total.errors + ended.errors,
        publisher_wait_seconds=total.publisher_wait_seconds + ended.publisher_wait_seconds,
    )
