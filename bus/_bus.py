"""The event bus: per-job sequencing, fan-out into subscriber buffers, batched wake-ups."""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Iterable, Mapping
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from ._delivery import BusStatistics, DeliveryPolicy
from ._errors import BusClosed, BusError, WouldBlock
from ._events import Event, EventType, event_type_for, event_types
from ._subscription import Subscription
from ._wakeup import LoopNotifier

if TYPE_CHECKING:
    from ._subscriber import Subscriber, SubscriberHandle

__all__ = ["EventBus"]


_new_event = tuple.__new__
_now = time.time
_EMPTY: Mapping[str, Any] = MappingProxyType({})


class _Route:
    """The subscriptions that receive one (job, event type), precomputed for the fast path."""

    __slots__ = (
        "appends",
        "every",
        "lossless",
        "lossless_bounds",
        "lossy",
        "lossy_bounds",
        "published",
    )

    def __init__(self, every: tuple[Subscription, ...]) -> None:
        self.published = 0  # events published on this route (folded into the bus's totals)
        self.every = every
        self.lossless = tuple(s for s in every if not s._lossy)
        self.lossy = tuple(s for s in every if s._lossy)
        # (buffer, size[, subscription]) triples: local unpacking beats attribute lookups
        self.lossless_bounds = tuple((s._items, s.buffer_size) for s in self.lossless)
        self.lossy_bounds = tuple((s._items, s.buffer_size, s) for s in self.lossy)
        self.appends = tuple(s._items.append for s in every)


class _Job:
    """What the bus keeps per job: its last ``seq`` and its routes by event type."""

    __slots__ = ("routes", "seq")

    def __init__(self, seq: int = 0) -> None:
        self.seq = seq
        self.routes: dict[EventType, _Route] = {}


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

    :meth:`publish` may be called from any thread. The fast path takes one lock, appends to
    each matching buffer and wakes the event loop at most once per batch of events.
    """

    def __init__(self, *, drain_timeout: float = 10.0) -> None:
        self.drain_timeout = drain_timeout
        self._lock = threading.Lock()
        self._space = threading.Condition(self._lock)
        self._subscriptions: list[Subscription] = []
        self._jobs: dict[str, _Job] = {}
        self._published_by_type: dict[EventType, int] = dict.fromkeys(EventType, 0)
        self._closed = False
        self._draining = False  # closed, but subscribers may still report their errors
        self._notifier: LoopNotifier | None = None
        self._waiting = 0  # consumers waiting for events and not yet queued for a wake-up
        self._pending_wake: list[Subscription] = []
        self._wake_scheduled = False
        self._blocked_publishers = 0
        self._async_space_waiters: list[anyio.Event] = []
        self._task_group: TaskGroup | None = None
        self._handles: list[SubscriberHandle] = []

    # -- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> EventBus:
        self._notifier = LoopNotifier()
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
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

    # -- sequencing -------------------------------------------------------------------------

    def last_seq(self, job_id: str) -> int:
        """The ``seq`` of the last event published for ``job_id`` (0 if none)."""
        with self._lock:
            job = self._jobs.get(job_id)
            return 0 if job is None else job.seq

    def restore_sequence(self, job_id: str, last_seq: int) -> None:
        """Continue ``job_id``'s numbering after ``last_seq`` (for a job restored from a store).

        :raises BusError: if events after ``last_seq`` were already published.
        """
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                self._jobs[job_id] = _Job(last_seq)
            elif last_seq < job.seq:
                raise BusError(
                    f"cannot move job {job_id!r} back to seq {last_seq}: "
                    f"seq {job.seq} was already published"
                )
            else:
                job.seq = last_seq

    def forget(self, job_id: str) -> None:
        """Drop what the bus remembers of ``job_id`` (its seq counter and routes)."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            if job is not None:
                self._fold_counts(job)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self, job_id: str, type: EventType | str, data: Mapping[str, Any] | None = None
    ) -> Event:
        """Publish an event from any thread and return it (with its ``seq``).

        From a plain thread this waits while a lossless subscriber's buffer is full. On the
        event-loop thread it cannot wait without deadlocking the loop, so it never does (the
        buffer may briefly exceed its size); use :meth:`publish_async` there when
        backpressure matters.

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
            job = self._jobs.get(job_id)
            if job is None:
                job = self._jobs[job_id] = _Job()
            route = job.routes.get(type)
            if route is None:
                route = self._route(job, job_id, type)
            for items, size in route.lossless_bounds:
                if len(items) >= size:
                    if self._notifier is None or not self._notifier.in_loop_thread():
                        route = self._wait_for_space(job, job_id, type)
                    break
            seq = job.seq = job.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            route.published += 1
            for items, size, subscription in route.lossy_bounds:
                if len(items) >= size:
                    subscription._overflow()
            for append in route.appends:
                append(event)
            wake = self._waiting and self._collect_wake(route)
        finally:
            lock.release()
        if wake:
            self._schedule_wake()
        return event

    def publish_nowait(
        self, job_id: str, type: EventType | str, data: Mapping[str, Any] | None = None
    ) -> Event:
        """Publish without ever waiting.

        :raises WouldBlock: if a lossless subscriber's buffer is full (nothing is published).
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
            await waiter.wait()
            self._charge_wait(job_id, event_type, time.perf_counter() - started)

    def _try_publish(
        self,
        job_id: str,
        type: EventType,
        data: Mapping[str, Any] | None,
        waiter: anyio.Event | None,
        *,
        during_drain: bool = False,
    ) -> Event | None:
        me = current_subscription.get()
        with self._lock:
            if self._closed and not (during_drain and self._draining):
                raise BusClosed("the bus is closed")
            job = self._jobs.get(job_id)
            if job is None:
                job = self._jobs[job_id] = _Job()
            route = job.routes.get(type) or self._route(job, job_id, type)
            for subscription in route.lossless:
                if subscription is not me and subscription._is_full():
                    if waiter is not None:
                        self._async_space_waiters.append(waiter)
                    return None
            seq = job.seq = job.seq + 1
            event = _new_event(Event, (job_id, seq, type, _now(), _EMPTY if data is None else data))
            route.published += 1
            for subscription in route.lossy:
                if subscription._is_full():
                    subscription._overflow()
            for append in route.appends:
                append(event)
            wake = self._waiting and self._collect_wake(route)
        if wake:
            self._schedule_wake()
        return event

    def _publish_report(self, job_id: str, data: Mapping[str, Any]) -> None:
        """Publish a ``subscriber_error``, also while the bus drains after being closed."""
        if self._try_publish(job_id, EventType.SUBSCRIBER_ERROR, data, None, during_drain=True):
            return
        # A full lossless buffer: the report must not wait inside a handler; buffers may
        # briefly exceed their size rather than lose an error report.
        with self._lock:
            job = self._jobs.setdefault(job_id, _Job())
            route = job.routes.get(EventType.SUBSCRIBER_ERROR) or self._route(
                job, job_id, EventType.SUBSCRIBER_ERROR
            )
            self._append_unchecked(job, job_id, EventType.SUBSCRIBER_ERROR, data, route)
            wake = self._waiting and self._collect_wake(route)
        if wake:
            self._schedule_wake()

    def _append_unchecked(
        self, job: _Job, job_id: str, type: EventType, data: Mapping[str, Any], route: _Route
    ) -> Event:
        seq = job.seq = job.seq + 1
        event = _new_event(Event, (job_id, seq, type, _now(), data))
        route.published += 1
        for items, size, subscription in route.lossy_bounds:
            if len(items) >= size:
                subscription._overflow()
        for append in route.appends:
            append(event)
        return event

    def _collect_wake(self, route: _Route) -> bool:
        """With the lock held: queue waiting consumers on ``route``; True to schedule a wake.

        ``_waiting`` counts consumers that wait and are not queued yet, so once they are
        queued, further publishes skip this until a consumer waits again.
        """
        for subscription in route.every:
            if subscription._waiter is not None and not subscription._wake_pending:
                subscription._wake_pending = True
                self._waiting -= 1
                self._pending_wake.append(subscription)
        if self._pending_wake and not self._wake_scheduled:
            self._wake_scheduled = True
            return True
        return False

    def _wait_for_space(self, job: _Job, job_id: str, type: EventType) -> _Route:
        """With the lock held, wait until every lossless buffer on the route has room."""
        started = time.perf_counter()
        full: set[Subscription] = set()
        self._blocked_publishers += 1
        try:
            while True:
                if self._closed:
                    raise BusClosed("the bus was closed while waiting for buffer room")
                route = job.routes.get(type) or self._route(job, job_id, type)
                blocking = [s for s in route.lossless if s._is_full()]
                if not blocking:
                    return route
                full.update(blocking)
                self._space.wait(timeout=1.0)
        finally:
            self._blocked_publishers -= 1
            waited = time.perf_counter() - started
            for subscription in full:
                subscription._add_wait(waited)

    def _charge_wait(self, job_id: str, type: EventType, seconds: float) -> None:
        with self._lock:
            job = self._jobs.get(job_id)
            route = None if job is None else job.routes.get(type)
            if route is not None:
                for subscription in route.lossless:
                    subscription._add_wait(seconds)

    def _route(self, job: _Job, job_id: str, type: EventType) -> _Route:
        route = _Route(tuple(s for s in self._subscriptions if s.matches(job_id, type)))
        job.routes[type] = route
        return route

    def _invalidate_routes(self) -> None:
        for job in self._jobs.values():
            self._fold_counts(job)
            job.routes.clear()

    def _fold_counts(self, job: _Job) -> None:
        for event_type, route in job.routes.items():
            self._published_by_type[event_type] += route.published
            route.published = 0

    # -- wake-ups ---------------------------------------------------------------------------

    def _schedule_wake(self) -> None:
        notifier = self._notifier
        if notifier is not None and notifier.in_loop_thread():
            self._wake_waiters()
        elif notifier is None or not notifier.call_soon(self._wake_waiters):
            with self._lock:
                self._wake_scheduled = False

    def _wake_waiters(self) -> None:
        with self._lock:
            pending, self._pending_wake = self._pending_wake, []
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
        """Called with the lock held when a consumer took events out of ``subscription``."""
        if not subscription._lossy:
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
        :param buffer_size: events buffered before the policy applies.
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
            self._invalidate_routes()
        return subscription

    def _unsubscribe(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)
                self._invalidate_routes()
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
        handle = SubscriberHandle(subscriber, subscription)
        self._handles.append(handle)
        self._task_group.start_soon(
            run_subscriber, self, handle, name=f"subscriber {subscriber.name}"
        )
        return handle

    def _handle_finished(self, handle: SubscriberHandle) -> None:
        if handle in self._handles:
            self._handles.remove(handle)

    def wait_processed(self, event: Event, timeout: float | None = None) -> bool:
        """From a non-loop thread, wait until every attached lossless subscriber that receives
        ``event`` has handled it. Returns False on timeout.

        Trainers use this at epoch ends so that controllers decide before the next epoch.
        """
        handles = [
            h
            for h in list(self._handles)
            if h.subscription.policy is DeliveryPolicy.LOSSLESS
            and h.subscription.matches(event.job_id, event.type)
        ]
        deadline = None if timeout is None else time.monotonic() + timeout
        for handle in handles:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not handle.wait_processed(event.job_id, event.seq, remaining):
                return False
        return True

    # -- introspection ----------------------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        with self._lock:
            return tuple(self._subscriptions)

    def statistics(self) -> BusStatistics:
        """A snapshot of the bus's counters and of every subscription's statistics."""
        subscriptions = self.subscriptions
        with self._lock:
            counts = dict(self._published_by_type)
            for job in self._jobs.values():
                for event_type, route in job.routes.items():
                    counts[event_type] += route.published
            published = sum(counts.values())
            by_type = {t.value: n for t, n in counts.items() if n}
            closed = self._closed
        return BusStatistics(
            published=published,
            published_by_type=by_type,
            subscriptions=tuple(s.statistics() for s in subscriptions),
            closed=closed,
        )
