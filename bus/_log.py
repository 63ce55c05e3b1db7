"""Per-job event logs: one append per event, read by every subscription through a cursor.

Every event of a job goes into that job's log once, whatever the number of subscribers.
Each subscription following the job keeps a cursor (the next ``seq`` it will read). Since a
job's ``seq`` is gap-free, position and ``seq`` are the same thing: ``events[i].seq ==
base + i``. That makes a lossy subscriber's missed range plain arithmetic, and lets the log
be trimmed in bulk once every cursor has moved past the front.
"""

from __future__ import annotations

import sys
from collections import Counter
from operator import itemgetter
from typing import TYPE_CHECKING

from ._delivery import DeliveryPolicy
from ._events import Event, EventType

if TYPE_CHECKING:
    from ._subscription import Subscription

__all__ = ["Cursor", "JobLog"]

_TRIM_SLACK = 1024  # consumed events kept before a bulk trim (amortises the list shift)
_type_of = itemgetter(2)  # Event is a named tuple; index 2 is its type


class Cursor:
    """Where one subscription stands in one job's log."""

    __slots__ = ("end_seq", "log", "next_seq", "subscription")

    def __init__(self, subscription: Subscription, log: JobLog) -> None:
        self.subscription = subscription
        self.log = log
        self.next_seq = log.seq + 1
        self.end_seq: int | None = None  # set when the subscription closes: read up to here

    def last_readable(self) -> int:
        return self.log.seq if self.end_seq is None else min(self.log.seq, self.end_seq)

    def backlog(self) -> int:
        return self.last_readable() - self.next_seq + 1

    def skip_filtered(self) -> None:
        """Move past the unread events the subscription's type filter skips anyway (not
        past events a lossy reader lost: it still hears of those as a ``gap``)."""
        types = self.subscription.types
        log = self.log
        if types is None or self.next_seq < log.base:
            return
        events = log.events
        position = self.next_seq - log.base
        last = self.last_readable() - log.base
        while position <= last and events[position].type not in types:
            position += 1
        self.next_seq = log.base + position


class JobLog:
    """The buffered events of one job and the cursors reading them.

    ``limit`` is the highest ``seq`` a publisher may append without taking the slow path,
    which trims the log and applies lossless backpressure.
    """

    __slots__ = ("base", "cursors", "events", "job_id", "limit", "seq", "waiting_readers")

    def __init__(self, job_id: str, seq: int = 0) -> None:
        self.job_id = job_id
        self.seq = seq
        self.events: list[Event] = []
        self.base = seq + 1
        self.cursors: list[Cursor] = []
        self.limit = seq + _TRIM_SLACK
        self.waiting_readers = 0

    def lossless_bound(self, exempt: Subscription | None = None) -> int:
        """The highest ``seq`` every lossless reader has room for."""
        bound = sys.maxsize
        for cursor in self.cursors:
            subscription = cursor.subscription
            if cursor.end_seq is None and not subscription._lossy and subscription is not exempt:
                bound = min(bound, cursor.next_seq + subscription.buffer_size - 1)
        return bound

    def skip_filtered(self) -> None:
        """Move each filtering cursor past the unread events its filter skips anyway.

        Readers are woken only for events they want; this keeps a lossless reader that
        waits for rarer types from holding the log (and its publishers) back.
        """
        for cursor in self.cursors:
            if cursor.subscription.types is not None:
                cursor.skip_filtered()

    def trim(self, counts: Counter[EventType]) -> None:
        """Drop the events no cursor still needs, counting their types into ``counts``.

        A lossy reader never holds more than its buffer size back: what it has not read by
        then is lost to it, and it hears so as a ``gap`` when it next reads.
        """
        keep_from = self.seq + 1
        for cursor in self.cursors:
            subscription = cursor.subscription
            start = cursor.next_seq
            if subscription._lossy:
                start = max(start, self.seq - subscription.buffer_size + 1)
            keep_from = min(keep_from, start)
        drop = keep_from - self.base
        if drop > 0:
            dropped = self.events[:drop]
            counts.update(map(_type_of, dropped))
            del self.events[:drop]
            self.base = keep_from

    def refresh_limit(self) -> None:
        """Recompute the fast-path limit after a trim or a change of readers."""
        longest_lossy = max(
            (c.subscription.buffer_size for c in self.cursors if c.subscription._lossy),
            default=0,
        )
        self.limit = min(
            self.lossless_bound(), self.base + max(longest_lossy, _TRIM_SLACK) + _TRIM_SLACK
        )

    def read(self, cursor: Cursor, limit: float) -> tuple[tuple[int, int] | None, list[Event]]:
        """Advance ``cursor``: (missed ``(from_seq, to_seq)`` or None, events in order).

        ``limit`` bounds the number of events returned that pass the reader's type filter.
        """
        subscription = cursor.subscription
        last = cursor.last_readable()
        first = cursor.next_seq
        start = max(first, self.base)
        if subscription._lossy:
            backlog = last - start + 1
            if backlog > subscription.buffer_size:
                start = (
                    last
                    if subscription.policy is DeliveryPolicy.LATEST
                    else last - subscription.buffer_size + 1
                )
        missed = (first, start - 1) if start > first else None
        offset = start - self.base
        stop = last - self.base + 1  # one past the last readable position
        types = subscription.types
        if types is None:
            if limit < stop - offset:
                stop = offset + int(limit)
            batch = self.events[offset:stop]
            cursor.next_seq = start + len(batch)
            return missed, batch
        batch = []
        position = offset
        events = self.events
        count = stop
        while position < count and len(batch) < limit:
            event = events[position]
            if event.type in types:
                batch.append(event)
            position += 1
        cursor.next_seq = self.base + position
        return missed, batch
