"""The subscriber base class and the task that runs one subscriber."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskGroup

from ._delivery import DeliveryPolicy
from ._errors import BusClosed
from ._events import Event, EventType, event_types
from ._readers import ReaderWakeUps
from ._subscription import Subscription, current_subscription

__all__ = ["AttachedSubscribers", "Subscriber", "SubscriberHandle"]

logger = logging.getLogger(__name__)

_Handler = Callable[[Event], Awaitable[None]]


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Subscriber:
    """Base class for bus subscribers.

    Write per-type handlers named after the event type (``async def on_train_epoch_end(self,
    event)``), or override :meth:`on_event` for every event, or :meth:`on_events` to handle
    whole batches (an event store writes one transaction per batch). When only per-type
    handlers exist, the subscription is filtered to those types.

    Class attributes (overridable per instance) choose the delivery: ``policy``,
    ``buffer_size``, ``max_batch``, and the filters ``job_id`` and ``types``; ``steers_training``
    says whether a trainer waits for it at epoch ends (see below).
    A handler that raises is reported as a ``subscriber_error`` event; the subscriber keeps
    running and neither the job nor other subscribers notice.
    """

    policy: ClassVar[DeliveryPolicy] = DeliveryPolicy.LOSSLESS
    buffer_size: int = 1024
    max_batch: int = 512
    job_id: str | None = None
    types: Iterable[EventType | str] | None = None
    steers_training: ClassVar[bool] = True
    """True (the default): at each epoch end the trainer waits until this lossless subscriber
    has handled ``fit_epoch_end``, so that what it sends back (a stop, a new learning rate)
    takes effect before the next epoch. Subscribers that only record (an event store, an
    exporter) set False, and training never waits for them."""

    @property
    def name(self) -> str:
        """The name shown in statistics and metrics (default: the class name in snake case)."""
        return _snake_case(type(self).__name__)

    async def on_start(self) -> None:
        """Called in the subscriber's task before the first event."""

    async def on_stop(self) -> None:
        """Called in the subscriber's task after the last event (the bus closed or detached)."""

    async def on_event(self, event: Event) -> None:
        """Called for each event that has no ``on_<type>`` handler."""

    async def on_events(self, events: Sequence[Event]) -> None:
        """Called with each batch when overridden; by default each event goes to its
        ``on_<type>`` handler or :meth:`on_event`, each failure reported on its own."""
        handlers = self._handlers()
        for event in events:
            await handlers.get(event.type, self.on_event)(event)

    def _handlers(self) -> dict[EventType, _Handler]:
        handlers: dict[EventType, _Handler] = {}
        for event_type in EventType:
            method = getattr(type(self), f"on_{event_type.value}", None)
            if method is not None:
                handlers[event_type] = getattr(self, f"on_{event_type.value}")
        return handlers

    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Subscriber, method)

    def subscribed_types(self) -> frozenset[EventType] | None:
        """The type filter: ``types`` if given, else the handled types when only per-type
        handlers are written, else every type."""
        if self.types is not None:
            return event_types(self.types)
        if self._overrides("on_event") or self._overrides("on_events"):
            return None
        return frozenset(self._handlers())


class SubscriberHandle:
    """The running side of an attached subscriber: its subscription and its progress."""

    def __init__(self, subscriber: Subscriber, subscription: Subscription) -> None:
        self.subscriber = subscriber
        self.subscription = subscription
        self.finished = anyio.Event()
        self.cancel_scope = anyio.CancelScope()
        self._processed: dict[str, int] = {}
        self._progress = threading.Condition()
        self._done = False

    def statistics(self) -> object:
        return self.subscription.statistics()

    def processed_seq(self, job_id: str) -> int:
        """The ``seq`` of ``job_id`` up to which this subscriber has finished handling every
        event that reaches it (events its filters skip count as handled)."""
        with self._progress:
            return self._processed.get(job_id, 0)

    def _mark_processed(self, read_up_to: dict[str, int]) -> None:
        """``read_up_to``: per job, the last ``seq`` the handled batch was read from (one
        entry per job, not per event: batches of a busy job hold thousands)."""
        with self._progress:
            self._processed.update(read_up_to)
            self._progress.notify_all()

    def _mark_done(self) -> None:
        with self._progress:
            self._done = True
            self._progress.notify_all()

    def wait_processed(self, job_id: str, seq: int, timeout: float | None = None) -> bool:
        """From a thread, wait until this subscriber handled ``seq`` of ``job_id`` (or ended)."""
        with self._progress:
            return self._progress.wait_for(
                lambda: self._done or self._processed.get(job_id, 0) >= seq, timeout
            )

    async def detach(self) -> None:
        """Stop new events reaching the subscriber, let it handle what is buffered, wait."""
        self.subscription.close()
        await self.finished.wait()


class AttachedSubscribers:
    """The running subscribers of one bus: their tasks, and waiting for them to catch up."""

    def __init__(
        self,
        lock: threading.Lock,
        wakeups: ReaderWakeUps,
        *,
        publish_report: Callable[[str, Mapping[str, Any]], object],
        drain_timeout: Callable[[], float],
    ) -> None:
        """:param publish_report: publishes a ``subscriber_error`` of a job, also while the
            bus drains after its close, never waiting for room.
        :param drain_timeout: the seconds a stopping subscriber's ``on_stop`` may take."""
        self._lock = lock
        self._wakeups = wakeups
        self.publish_report = publish_report
        self.drain_timeout = drain_timeout
        self._handles: list[SubscriberHandle] = []

    def start(
        self,
        task_group: TaskGroup,
        subscriber: Subscriber,
        subscription: Subscription,
    ) -> SubscriberHandle:
        """Run ``subscriber`` on ``subscription`` in a task of ``task_group``."""
        subscription.consumer_running = True
        handle = SubscriberHandle(subscriber, subscription)
        self._handles.append(handle)
        task_group.start_soon(run_subscriber, handle, self, name=f"subscriber {subscriber.name}")
        return handle

    def finished(self, handle: SubscriberHandle) -> None:
        if handle in self._handles:
            self._handles.remove(handle)

    def count_error(self, subscriber: Subscriber) -> None:
        """Count a failure ``subscriber`` caught itself in its statistics' ``errors``."""
        for handle in list(self._handles):
            if handle.subscriber is subscriber:
                handle.subscription.errors += 1

    async def drain(self, timeout: float) -> None:
        """Give the subscribers ``timeout`` seconds to finish, then cancel the rest (only
        their tasks: the bus's task group also encloses the body of its ``async with``)."""
        with anyio.move_on_after(timeout):
            for handle in list(self._handles):
                await handle.finished.wait()
        for handle in list(self._handles):
            handle.cancel_scope.cancel()

    def wait_processed(self, event: Event, timeout: float | None, *, steering_only: bool) -> bool:
        """See :meth:`EventBus.wait_processed`."""
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
            self._wakeups.processed_waiters += 1
            self._wakeups.hurry()
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            for handle in handles:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not handle.wait_processed(event.job_id, event.seq, remaining):
                    return False
            return True
        finally:
            with self._lock:
                self._wakeups.processed_waiters -= 1


async def run_subscriber(handle: SubscriberHandle, attached: AttachedSubscribers) -> None:
    """The task body of one attached subscriber."""
    subscriber = handle.subscriber
    subscription = handle.subscription
    current_subscription.set(subscription)
    handlers = subscriber._handlers()
    fallback = subscriber.on_event
    batch_handler = subscriber.on_events if subscriber._overrides("on_events") else None

    with handle.cancel_scope:
        try:
            await _consume(
                attached, handle, subscriber, subscription, handlers, fallback, batch_handler
            )
        finally:
            attached.finished(handle)
            handle.finished.set()


async def _consume(
    attached: AttachedSubscribers,
    handle: SubscriberHandle,
    subscriber: Subscriber,
    subscription: Subscription,
    handlers: dict[EventType, _Handler],
    fallback: _Handler,
    batch_handler: Callable[[Sequence[Event]], Awaitable[None]] | None,
) -> None:
    try:
        try:
            await subscriber.on_start()
        except Exception as error:
            await _report(attached, subscriber, subscription, None, error)
        while True:
            try:
                batch = await subscription.receive_batch(subscriber.max_batch, gather=True)
            except anyio.EndOfStream:
                break
            read_up_to = subscription.taken  # set by the take that gave ``batch``
            if batch_handler is not None:
                try:
                    await batch_handler(batch)
                except Exception as error:
                    await _report(attached, subscriber, subscription, batch[0], error)
            else:
                for event in batch:
                    try:
                        await handlers.get(event.type, fallback)(event)
                    except Exception as error:
                        await _report(attached, subscriber, subscription, event, error)
            handle._mark_processed(read_up_to)
    finally:
        handle._mark_done()
        with anyio.CancelScope(shield=True), anyio.move_on_after(attached.drain_timeout()):
            try:
                await subscriber.on_stop()
            except Exception:
                logger.exception("subscriber %s failed while stopping", subscriber.name)
                subscription.errors += 1
        subscription.consumer_running = False
        subscription.close()


async def _report(
    attached: AttachedSubscribers,
    subscriber: Subscriber,
    subscription: Subscription,
    event: Event | None,
    error: Exception,
) -> None:
    """Count a handler failure and publish it as a ``subscriber_error`` event."""
    subscription.errors += 1
    where = "starting" if event is None else f"{event.type.value} #{event.seq}"
    logger.error("subscriber %s failed on %s: %r", subscriber.name, where, error)
    if event is not None and event.type is EventType.SUBSCRIBER_ERROR:
        return  # reporting an error about an error report could loop forever
    data = {
        "subscriber": subscriber.name,
        "event_type": None if event is None else event.type.value,
        "event_seq": None if event is None else event.seq,
        "error_type": type(error).__name__,
        "message": str(error),
    }
    job_id = subscriber.job_id or "" if event is None else event.job_id
    try:
        attached.publish_report(job_id, data)
    except BusClosed:
        logger.warning("subscriber %s error not published: the bus is closed", subscriber.name)
