"""Waking readers: one owner for who waits for events, who is queued, and when to wake them.

The bus (the publishing end) and every subscription (the reading end) share one
:class:`ReaderWakeUps`, as both ends of an anyio memory stream share one state object. Each
subscription has a :class:`WaitSlot` in it. Unless a method says otherwise, callers hold the
bus lock, which this object shares.

The policy: a publisher on the loop thread wakes the readers it concerns at once; one on
another thread hands them to a coalescer, which wakes them once per interval while events
keep coming (doubling the interval each busy round, up to a maximum). Every wake-up from a
thread costs a trip through the loop and a GIL hand-over that stalls the publishing training
thread. A publisher waiting for room, or a thread waiting for readers to catch up, does not
wait for a round.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskGroup

from ._events import EventType
from ._wakeup import LoopNotifier

__all__ = ["ReaderWakeUps", "WaitSlot"]


class WaitSlot:
    """One subscription's place in the wake-ups: the event its consumer waits on, if any."""

    __slots__ = ("queued", "types", "waiter")

    def __init__(self, types: frozenset[EventType] | None) -> None:
        self.types = types
        self.waiter: anyio.Event | None = None
        self.queued = False  # in the queue of the next wake-up (so not counted as waiting)


class ReaderWakeUps:
    """The wake-up state of one bus, shared by the bus and its subscriptions."""

    def __init__(self, lock: threading.Lock, wake_interval: float, max_wake_interval: float):
        self.wake_interval = wake_interval
        self.max_wake_interval = max(wake_interval, max_wake_interval)
        self.blocked_publishers = 0  # threads waiting for buffer room
        self.processed_waiters = 0  # threads in wait_processed: gathering readers take now
        self._lock = lock
        self._notifier: LoopNotifier | None = None
        self.waiting = 0  # slots with a waiter, not queued yet (publishers check it first)
        self._queue: list[WaitSlot] = []
        self._scheduled = False  # a wake-up (or the coalescer's spell) is under way
        self._quiet_signal: anyio.Event | None = None
        self._coalescer: anyio.CancelScope | None = None

    # -- the loop (no lock) ------------------------------------------------------------------

    def bind_loop(self) -> None:
        """Remember the running event loop (once) to wake readers on it from any thread."""
        if self._notifier is None:
            self._notifier = LoopNotifier()

    def start(self, task_group: TaskGroup, published_marker: Callable[[], int]) -> None:
        """Run the coalescer in ``task_group``; ``published_marker()`` (called with the lock
        held) must change whenever an event is published."""
        self._notifier = LoopNotifier()
        self._quiet_signal = anyio.Event()
        self._coalescer = anyio.CancelScope()
        task_group.start_soon(self._coalesce, published_marker, name="bus wake-ups")

    def stop(self) -> None:
        if self._coalescer is not None:
            self._coalescer.cancel()

    def in_loop_thread(self) -> bool:
        return self._notifier is not None and self._notifier.in_loop_thread()

    # -- the reading end (lock held) ---------------------------------------------------------

    def waiter_for(self, slot: WaitSlot) -> anyio.Event:
        """The event the consumer of ``slot`` waits on until something arrives for it."""
        current = slot.waiter
        if current is None or current.is_set():
            if current is None:
                self.waiting += 1
            current = slot.waiter = anyio.Event()
        return current

    def round_coming(self, slot: WaitSlot) -> bool:
        """True when a coalescer round is due and nobody needs the readers sooner."""
        return (
            self._scheduled  # a quiet bus: a round may never come
            and not self.blocked_publishers
            and not self.processed_waiters
            and slot.waiter is None
        )

    def queue_for_round(self, slot: WaitSlot) -> anyio.Event:
        """Queue ``slot`` for the next round; its consumer waits on the returned event."""
        slot.queued = True
        self._queue.append(slot)
        waiter = slot.waiter = anyio.Event()
        return waiter

    def release(self, slot: WaitSlot) -> anyio.Event | None:
        """Forget the consumer's waiter (it is closing) and return it for the caller to set."""
        waiter = slot.waiter
        if waiter is not None:
            slot.waiter = None
            if not slot.queued:
                self.waiting -= 1
        return waiter

    # -- the publishing end ------------------------------------------------------------------

    def announce(self, slots: Iterable[WaitSlot], event_type: EventType | None) -> bool:
        """With the lock held: queue the waiting ``slots`` that want ``event_type`` (None:
        every one); True when the caller must call :meth:`wake` after releasing the lock.

        Once queued, readers are not counted as waiting, so further publishes skip this
        until a consumer waits again. A reader whose filter skips ``event_type`` is not woken
        for it (``JobLog.skip_filtered`` moves its cursor past such events instead).
        """
        if not self.waiting:
            return False
        for slot in slots:
            types = slot.types
            if (
                slot.waiter is not None
                and not slot.queued
                and (types is None or event_type is None or event_type in types)
            ):
                slot.queued = True
                self.waiting -= 1
                self._queue.append(slot)
        if self._queue and not self._scheduled:
            self._scheduled = True
            return True
        return False

    def wake(self, *, coalesce: bool = True) -> None:
        """Without the lock, after :meth:`announce` said so: wake the queued readers, on the
        loop thread at once, from another thread through the coalescer (or at once without
        ``coalesce``)."""
        notifier = self._notifier
        if notifier is not None and notifier.in_loop_thread():
            self._wake_queued()
            return
        if not self._call_on_loop(coalesce):
            with self._lock:
                self._scheduled = False

    def wake_before_waiting(self, slots: Iterable[WaitSlot]) -> None:
        """With the lock held, before a publisher waits for room: wake the readers of its
        job now, not at the coalescer's next round."""
        if not self.announce(slots, None):
            self.hurry()
        elif not self._call_on_loop(coalesce=True):
            self._scheduled = False

    def hurry(self) -> None:
        """With the lock held: wake the queued readers now, not at the next round."""
        if self._queue and self._notifier is not None:
            self._notifier.call_soon(self._wake_queued_in_spell)

    def _call_on_loop(self, coalesce: bool) -> bool:
        notifier = self._notifier
        callback = (
            self._wake_from_thread
            if coalesce and self._quiet_signal is not None
            else self._wake_queued
        )
        return notifier is not None and notifier.call_soon(callback)

    # -- on the loop -------------------------------------------------------------------------

    def _wake_from_thread(self) -> None:
        """Wake who waits now, then let the coalescer gather further wake-ups into rounds."""
        self._wake_queued(keep_scheduled=True)
        assert self._quiet_signal is not None
        self._quiet_signal.set()

    def _wake_queued_in_spell(self) -> None:
        self._wake_queued(keep_scheduled=True)

    def _wake_queued(self, *, keep_scheduled: bool = False) -> None:
        with self._lock:
            queue, self._queue = self._queue, []
            if not keep_scheduled:
                self._scheduled = False
            waiters = []
            for slot in queue:
                waiter = slot.waiter
                slot.waiter = None
                slot.queued = False
                if waiter is not None:
                    waiters.append(waiter)
        for waiter in waiters:
            waiter.set()

    async def _coalesce(self, published_marker: Callable[[], int]) -> None:
        """While events keep coming, wake the queued readers once per interval, doubling the
        interval each busy round (up to ``max_wake_interval``)."""
        assert self._coalescer is not None
        with self._coalescer:
            while True:
                assert self._quiet_signal is not None
                await self._quiet_signal.wait()
                self._quiet_signal = anyio.Event()
                interval = self.wake_interval
                with self._lock:
                    published = published_marker()
                while True:
                    await anyio.sleep(interval)
                    with self._lock:
                        if not self._queue:
                            # Nobody to wake; the spell goes on while events keep coming
                            # (readers busy handling a batch gather the next at a round).
                            marker, published = published, published_marker()
                            if marker == published:
                                self._scheduled = False
                                break
                            continue
                        published = published_marker()
                    self._wake_queued(keep_scheduled=True)
                    interval = min(interval * 2, self.max_wake_interval)
