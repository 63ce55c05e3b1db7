"""Live fan-out of bus events to WebSocket clients: one bus subscription per server.

The hub reads the bus through one ``drop_oldest`` subscription (it never makes the bus wait),
encodes each event to JSON once, and appends the same encoded string to the bounded buffer of
every interested client. A client whose buffer overflows loses its oldest events and is told
so with a ``gap`` notice; one that has missed more than ``max_lag`` events is marked too slow
and its connection is closed (code 4008). :meth:`EventHub.close_job` ends the streams of a
deleted job. Everything here runs on the event loop's thread.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable

import anyio
from anyio.abc import TaskStatus

from trainbus.bus import DeliveryPolicy, Event, EventBus, EventType
from trainbus.sdk import to_json

from ._history import SeqGuard

__all__ = [
    "ClientBuffer",
    "EventHub",
    "HubStatistics",
    "Item",
    "encode_event",
    "gap_notice",
]

logger = logging.getLogger(__name__)

Item = tuple[str, int, str]
"""What a client buffer holds: ``(job_id, seq, encoded JSON)``, shared by every client."""
TypeFilter = frozenset[EventType] | None
"""A client's event types (None: every type)."""


def encode_event(event: Event) -> str:
    """The event as compact JSON; NaN and infinities (a diverging loss) become ``null``."""
    return to_json(event.to_dict())


def gap_notice(job_id: str, from_seq: int, to_seq: int, missed: int, subscriber: str) -> Item:
    """A ``gap`` event telling a client which ``seq`` range of ``job_id`` it missed."""
    event = Event(
        job_id,
        to_seq,
        EventType.GAP,
        time.time(),
        {"from_seq": from_seq, "to_seq": to_seq, "missed": missed, "subscriber": subscriber},
    )
    return (job_id, to_seq, encode_event(event))


class ClientBuffer:
    """One WebSocket client's bounded buffer of encoded events, filled by the hub.

    :param job_id: only this job's events (``None``: every job).
    :param types: only these event types (``None``: every type); gaps always pass.
    :param buffer_size: events kept while the client is behind; past it the oldest are
        dropped and reported as a gap (a client that had taken everything gets a whole
        round of the hub, however large).
    :param max_lag: events the client may miss before it is marked :attr:`too_slow`.
    """

    def __init__(
        self,
        *,
        job_id: str | None,
        types: frozenset[EventType] | None,
        buffer_size: int,
        max_lag: int,
        on_too_slow: Iterable[Callable[[], None]] = (),
    ) -> None:
        self.job_id = job_id
        self.types = types
        self.buffer_size = buffer_size
        self.max_lag = max_lag
        self.too_slow = False
        self.closed = False
        self.ended: tuple[int, str] | None = None
        """Set by :meth:`end`: the close code and reason the connection must close with."""
        self.replaying = False
        """While the connection reads history from the store, drops are refilled from the store
        later and do not count as lag: the client is not slow, the server is busy catching it
        up. While it sends, they count: then it is the client that holds the stream up."""
        self._items: deque[Item] = deque()
        self._missed: dict[str, list[int]] = {}  # job -> [from_seq, to_seq, count]
        self._lag = 0  # events missed since the client last emptied its buffer
        self._wake = anyio.Event()
        self.on_too_slow = list(on_too_slow)
        self.on_end: list[Callable[[], None]] = []
        self.delivered = 0
        self.dropped = 0
        self.send_started: float | None = None
        """When (``time.monotonic``) the connection began the send it is in, if it is in one:
        the hub's :meth:`EventHub.let_go_stalled_senders` lets a send that lasts too long go."""

    def __len__(self) -> int:
        return len(self._items)

    # -- hub side ---------------------------------------------------------------------------

    def _extend(self, items: list[Item]) -> None:
        if self.closed or self.too_slow or not items:
            return
        # A client that had taken everything gets the whole round, however large (a trainer
        # publishes 0.1 s of batch events at once): the bound is on what a client leaves
        # behind, so that a prompt reader is never sent to the event store for a burst.
        limit = self.buffer_size if self._items else max(self.buffer_size, len(items))
        self._items.extend(items)
        excess = len(self._items) - limit
        if excess > 0:
            self._drop(excess)
        self._wake.set()

    def _drop(self, count: int) -> None:
        popleft = self._items.popleft
        for _ in range(count):
            job_id, seq, _encoded = popleft()
            self._record_missed(job_id, seq, seq, 1)
            if self.too_slow:  # the buffer was emptied: the connection is being closed
                return

    def _record_missed(
        self, job_id: str, from_seq: int, to_seq: int, count: int, *, lag: bool = True
    ) -> None:
        self.dropped += count
        if lag and not self.replaying:
            self._lag += count
        missed = self._missed.get(job_id)
        if missed is None:
            self._missed[job_id] = [from_seq, to_seq, count]
        else:
            missed[0] = min(missed[0], from_seq)
            missed[1] = max(missed[1], to_seq)
            missed[2] += count
        if self._lag > self.max_lag:
            self.mark_too_slow()

    def mark_too_slow(self) -> None:
        """The client cannot keep up (too much lag, or a send it did not take in time): stop
        buffering for it and run the :attr:`on_too_slow` callbacks, once."""
        if self.too_slow or self.closed:
            return
        self.too_slow = True
        self._items.clear()
        self._wake.set()
        for callback in self.on_too_slow:
            callback()

    def _gap(self, job_id: str, from_seq: int, to_seq: int, count: int) -> None:
        """The hub itself missed events (its bus buffer overflowed, or their seqs could not be
        reserved). The stream refills a job's missed range before its buffered events, so
        the events of ``job_id`` still buffered join the range: they come before it."""
        if self.closed or self.too_slow:
            return
        held = [item for item in self._items if item[0] == job_id]
        if held:
            self._items = deque(item for item in self._items if item[0] != job_id)
            self._record_missed(job_id, held[0][1], held[-1][1], len(held), lag=False)
        self._record_missed(job_id, from_seq, to_seq, count)
        self._wake.set()

    # -- connection side --------------------------------------------------------------------

    async def wait(self) -> None:
        """Wait until there is something to take, the client is too slow, or it closed."""
        if self._items or self._missed or self.too_slow or self.closed:
            return
        self._wake = anyio.Event()
        await self._wake.wait()

    def take(self, max_items: int) -> tuple[list[tuple[str, int, int, int]], list[Item]]:
        """Take the missed ranges (``job, from_seq, to_seq, count``) and up to ``max_items``
        buffered events, oldest first."""
        missed = [(job, lo, hi, n) for job, (lo, hi, n) in self._missed.items()]
        self._missed.clear()
        items = self._items
        if len(items) <= max_items:
            batch = list(items)
            items.clear()
        else:
            batch = [items.popleft() for _ in range(max_items)]
        if not items:
            self._lag = 0
        self.delivered += len(batch)
        return missed, batch

    def progressed(self) -> None:
        """The client took a message: the events it missed before no longer count as lag."""
        self._lag = 0

    def close(self) -> None:
        self.closed = True
        self._items.clear()
        self._wake.set()

    def end(self, code: int, reason: str) -> None:
        """Stop the stream: the connection closes with ``code`` and ``reason``; the
        :attr:`on_end` callbacks run (the connection cancels a send the client holds up)."""
        if self.closed or self.too_slow:
            return
        self.ended = (code, reason)
        self.close()
        for callback in self.on_end:
            callback()


class HubStatistics:
    """A snapshot of the hub: clients, events fanned out, drops and slow clients closed."""

    __slots__ = ("clients", "dropped", "events", "hub_missed", "too_slow")

    def __init__(
        self, clients: int, events: int, dropped: int, hub_missed: int, too_slow: int
    ) -> None:
        self.clients = clients
        self.events = events
        self.dropped = dropped
        self.hub_missed = hub_missed
        self.too_slow = too_slow

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.__slots__}


class EventHub:
    """Reads the bus once and fans encoded events out to :class:`ClientBuffer` instances."""

    def __init__(
        self, bus: EventBus, *, buffer_size: int = 65_536, batch_interval: float = 0.01
    ) -> None:
        self._bus = bus
        self._batch_interval = batch_interval
        self._buffer_size = buffer_size
        # Clients grouped by job and by type filter: a round selects each filter's events once
        # and skips a whole group its events miss (hundreds of clients waiting for a job's end
        # cost one dictionary entry per round, not one call each).
        self._by_job: dict[str, dict[TypeFilter, set[ClientBuffer]]] = {}
        self._every_job: dict[TypeFilter, set[ClientBuffer]] = {}
        self._events = 0
        self._hub_missed = 0
        self._dropped_by_closed = 0
        self._too_slow = 0
        self._watch = anyio.CancelScope()
        self.too_slow_listeners: list[Callable[[], None]] = []
        """Called on the event loop each time a client is marked too slow."""
        self._subscription = bus.subscribe(
            "websocket_hub", buffer_size=buffer_size, policy=DeliveryPolicy.DROP_OLDEST
        )
        self.seq_guard: SeqGuard | None = None
        """When set, no event is sent before its seq is durably reserved there (a seq a client
        saw never names another event after a crash); a job whose seqs cannot be reserved has
        its events reported to its clients as a gap instead."""

    def add(
        self,
        *,
        job_id: str | None,
        types: Iterable[EventType] | None,
        buffer_size: int,
        max_lag: int,
    ) -> ClientBuffer:
        """Register a client; it receives every matching event the hub handles from now on."""
        client = ClientBuffer(
            job_id=job_id,
            types=None if types is None else frozenset(types),
            buffer_size=buffer_size,
            max_lag=max_lag,
            on_too_slow=[self._count_too_slow],
        )
        groups = self._every_job if job_id is None else self._by_job.setdefault(job_id, {})
        groups.setdefault(client.types, set()).add(client)
        return client

    def remove(self, client: ClientBuffer) -> None:
        client.close()
        self._dropped_by_closed += client.dropped
        groups = self._every_job if client.job_id is None else self._by_job.get(client.job_id)
        if groups is None:
            return
        clients = groups.get(client.types)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del groups[client.types]
        if not groups and client.job_id is not None:
            del self._by_job[client.job_id]

    def close_job(self, job_id: str, code: int, reason: str) -> int:
        """End every stream that follows ``job_id`` alone (a deleted job); how many there were."""
        clients = [c for group in self._by_job.get(job_id, {}).values() for c in group]
        for client in clients:
            client.end(code, reason)
        return len(clients)

    async def let_go_stalled_senders(self, timeout: float) -> None:
        """Until :meth:`close`: mark too slow every client whose connection has been in one
        send for over ``timeout`` seconds (a client that never reads, replaying or live, however
        many others there are). One scan a second for all clients, nothing per send."""
        clock = time.monotonic
        with self._watch:
            while True:
                await anyio.sleep(min(1.0, timeout / 4))
                now = clock()
                for client in self.clients():
                    started = client.send_started
                    if started is not None and now - started > timeout:
                        client.mark_too_slow()

    def _count_too_slow(self) -> None:
        self._too_slow += 1
        logger.info("a WebSocket client fell more than its allowed lag behind; closing it")
        for listener in self.too_slow_listeners:
            listener()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Fan events out until the bus closes."""
        task_status.started()
        subscription = self._subscription
        interval = self._batch_interval
        clock = time.monotonic
        async with subscription:
            while True:
                try:
                    batch = await subscription.receive_batch()
                except anyio.EndOfStream:
                    break
                started = clock()
                refused = await self._reserve(batch)
                try:
                    self._fan_out(batch, refused)
                except Exception:  # a bug here must not end live streaming for everyone
                    logger.exception("websocket hub failed to fan out %d events", len(batch))
                # Under load, gather events for a few milliseconds before the next round:
                # each round wakes every client's sender once, so fewer, fuller rounds cost far
                # less than one round per event. An idle hub still forwards the first at once.
                rest = started + interval - clock()
                if rest > 0:
                    await anyio.sleep(rest)
        for client in self.clients():
            client.close()

    async def _reserve(self, batch: list[Event]) -> frozenset[str]:
        """Reserve the seqs of ``batch`` with the guard; return the jobs it refused."""
        guard = self.seq_guard
        if guard is None:
            return frozenset()
        highest: dict[str, int] = {}
        for event in batch:
            if event.seq > highest.get(event.job_id, 0):
                highest[event.job_id] = event.seq
        refused = set()
        for job_id, seq in highest.items():
            if seq > guard.reserved_seq(job_id):
                try:
                    await anyio.to_thread.run_sync(guard.reserve, job_id, seq)
                except Exception as error:  # a closed or failing store: report, never reuse
                    logger.warning("seq %d of job %s not sent live: %s", seq, job_id, error)
                    refused.add(job_id)
        return frozenset(refused)

    def clients(self) -> list[ClientBuffer]:
        clients = [c for group in self._every_job.values() for c in group]
        for groups in self._by_job.values():
            clients.extend(c for group in groups.values() for c in group)
        return clients

    def _fan_out(self, batch: list[Event], refused: frozenset[str] = frozenset()) -> None:
        by_job: dict[str, list[Event]] = {}
        for event in batch:
            events = by_job.get(event.job_id)
            if events is None:
                by_job[event.job_id] = [event]
            else:
                events.append(event)
        gap = EventType.GAP
        for job_id, events in by_job.items():
            groups = [*self._by_job.get(job_id, {}).items(), *self._every_job.items()]
            # Gap notices from the bus mean the hub itself fell behind: every client missed them.
            notices = [e for e in events if e.type is gap]
            if notices:
                events = [e for e in events if e.type is not gap]
                for notice in notices:
                    self._hub_missed += int(notice.data["missed"])
                    for _types, clients in groups:
                        for client in clients:
                            client._gap(
                                job_id,
                                int(notice.data["from_seq"]),
                                int(notice.data["to_seq"]),
                                int(notice.data["missed"]),
                            )
            if not events:
                continue
            if job_id in refused:  # not reserved: reported missed, never sent
                for _types, clients in groups:
                    for client in clients:
                        client._gap(job_id, events[0].seq, events[-1].seq, len(events))
                continue
            self._events += len(events)
            if not groups:
                continue
            items = [(job_id, e.seq, encode_event(e)) for e in events]
            for types, clients in groups:
                if types is None:
                    selected = items
                else:
                    selected = [
                        item for item, e in zip(items, events, strict=True) if e.type in types
                    ]
                    if not selected:
                        continue
                for client in list(clients):  # a client may end (and leave) while extended
                    client._extend(selected)

    def statistics(self) -> HubStatistics:
        clients = self.clients()
        return HubStatistics(
            clients=len(clients),
            events=self._events,
            dropped=self._dropped_by_closed + sum(c.dropped for c in clients),
            hub_missed=self._hub_missed,
            too_slow=self._too_slow,
        )

    def close(self) -> None:
        self._subscription.close()
        self._watch.cancel()
