"""Stored event history as the API reads it: an async view of the event store.

The store (``trainbus.subscribers.EventStore``) is written by a lossless subscriber; it may
lag a little behind the live stream. :meth:`EventHistory.wait_for` waits, with a deadline,
until it holds a given ``seq``, so that a WebSocket replay can join the live stream without a hole.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, Protocol, cast

import anyio

from trainbus.bus import Event, EventType

__all__ = ["EventHistory", "EventSource", "SeqGuard", "seq_guard_of"]


class EventSource(Protocol):
    """What the API needs of an event store (methods may be sync or async)."""

    def read(
        self,
        job_id: str,
        after_seq: int = 0,
        types: Iterable[EventType | str] | None = None,
        limit: int | None = None,
    ) -> Any: ...

    def last_seq(self, job_id: str) -> Any: ...


class SeqGuard(Protocol):
    """A store that reserves seqs durably before the live stream sends them, so that a seq a
    client saw never names another event after a crash (``trainbus.subscribers.EventStore``)."""

    def reserved_seq(self, job_id: str) -> int: ...

    def reserve(self, job_id: str, seq: int) -> None: ...


def seq_guard_of(source: object) -> SeqGuard | None:
    """``source`` as a :class:`SeqGuard` when it is one (None otherwise)."""
    if callable(getattr(source, "reserve", None)) and callable(
        getattr(source, "reserved_seq", None)
    ):
        return cast(SeqGuard, source)
    return None


async def _call(method: Any, *args: Any, **kwargs: Any) -> Any:
    if inspect.iscoroutinefunction(method):
        return await method(*args, **kwargs)
    # a synchronous store does SQLite I/O: keep it off the event loop
    return await anyio.to_thread.run_sync(lambda: method(*args, **kwargs))


class EventHistory:
    """Async access to an event store, with catch-up waiting."""

    def __init__(self, source: EventSource, *, catch_up_timeout: float = 10.0) -> None:
        self.source = source
        self.catch_up_timeout = catch_up_timeout

    async def read(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        types: frozenset[EventType] | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        result = await _call(
            self.source.read,
            job_id,
            after_seq=after_seq,
            types=None if types is None else sorted(types),
            limit=limit,
        )
        return list(result)

    async def last_seq(self, job_id: str) -> int:
        return int(await _call(self.source.last_seq, job_id))

    async def flush(self) -> None:
        flush = getattr(self.source, "flush", None)
        if flush is not None:
            await _call(flush)

    async def wait_for(self, job_id: str, seq: int) -> bool:
        """Wait until the store holds ``job_id``'s events up to ``seq``; False on timeout."""
        if seq <= 0 or await self.last_seq(job_id) >= seq:
            return True
        delay = 0.005
        with anyio.move_on_after(self.catch_up_timeout):
            while True:
                await self.flush()
                if await self.last_seq(job_id) >= seq:
                    return True
                # The store commits in batches; back off gently while it catches up.
                await anyio.sleep(delay)
                delay = min(delay * 2, 0.1)
        return False
