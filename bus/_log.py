"""Per-job event logs: one append per event, read by every subscription through a cursor.

Every event of a job goes into that job's log once, whatever the number of subscribers.
Each subscription following the job keeps a cursor (the next ``seq`` it will read). Since a
job's ``seq`` is gap-free, position and ``seq`` are the same thing: ``events[i].seq ==
base + i``. That makes a lossy subscriber's missed range plain arithmetic, and lets the log
be trimmed in bulk once every cursor has moved past the front.

A lossy cursor with a type filter counts its buffer in events of its own types: before a
trim drops events it has not read, the ones it wants move to the cursor's own ``spill``.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
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
    """Where one subscription stands in one job's log, and what it lost and not yet heard of.

    ``missed`` counts lost events of the subscription's types not yet announced by a ``gap``
    (``missed_from``/``missed_to``: the first and last of their seqs); a gap is always handed
    out before any later event of the job.
    """

    __slots__ = (
        "buffer_size",
        "end_seq",
        "latest",
        "log",
        "lossy",
        "missed",
        "missed_from",
        "missed_to",
        "next_seq",
        "slot",
        "spill",
        "subscription",
        "types",
    )

    def __init__(self, subscription: Subscription, log: JobLog) -> None:
        self.subscription = subscription
        self.log = log
        self.types = subscription.types
        self.buffer_size = subscription.buffer_size
        self.lossy = subscription.policy.is_lossy
        self.latest = subscription.policy is DeliveryPolicy.LATEST
        self.slot = subscription.wait_slot  # how publishers of this job wake the reader
        self.next_seq = log.seq + 1
        self.end_seq: int | None = None  # set when the subscription closes: read up to here
        # Events of its types a trim took out of the log before this lossy reader read them.
        self.spill: deque[Event] | None = deque() if self.lossy and self.types else None
        self.missed = 0
        self.missed_from = 0
        self.missed_to = 0

    def last_readable(self) -> int:
        return self.log.seq if self.end_seq is None else min(self.log.seq, self.end_seq)

    def backlog(self) -> int:
        """Unread seqs in the log (events of every type; spill and gap not included)."""
        return self.last_readable() - self.next_seq + 1

    def has_unread(self) -> bool:
        return self.next_seq <= self.last_readable() or bool(self.spill) or self.missed > 0

    def unread(self) -> int:
        """About how many items a read would hand out now (filtered events not yet skipped)."""
        return max(0, self.backlog()) + (len(self.spill) if self.spill else 0) + (self.missed > 0)

    def skip_filtered(self) -> None:
        """Move past the unread events the subscription's type filter skips anyway (not
        past events a lossy reader lost: it still hears of those as a ``gap``)."""
        types = self.types
        log = self.log
        if types is None or self.next_seq < log.base:
            return
        events = log.events
        position = self.next_seq - log.base
        last = self.last_readable() - log.base
        while position <= last and events[position].type not in types:
            position += 1
        self.next_seq = log.base + position

    def _lose(self, first: int, last: int, count: int) -> None:
        if not self.missed:
            self.missed_from = first
        self.missed_to = last
        self.missed += count

    def _gap(self) -> Event:
        """The ``gap`` event announcing what this cursor lost since its last read."""
        count, self.missed = self.missed, 0
        return Event(
            self.log.job_id,
            self.missed_to,
            EventType.GAP,
            time.time(),
            {
                "from_seq": self.missed_from,
                "to_seq": self.missed_to,
                "missed": count,
                "subscriber": self.subscription.name,
            },
        )

    def _spill_before(self, keep_from: int) -> None:
        """Before a trim to ``keep_from``: keep the unread events this filtering lossy reader
        wants (the newest ``buffer_size`` of them; older ones count as missed)."""
        spill = self.spill
        assert spill is not None and self.types is not None
        log = self.log
        types = self.types
        stop = min(keep_from, self.last_readable() + 1) - log.base
        for event in log.events[self.next_seq - log.base : stop]:
            if event.type in types:
                spill.append(event)
        self.next_seq = keep_from
        keep = 1 if self.latest and len(spill) > self.buffer_size else self.buffer_size
        while len(spill) > keep:
            lost = spill.popleft()
            self._lose(lost.seq, lost.seq, 1)

    def _own_unread(self) -> int:
        """How many unread events in the log pass this reader's type filter."""
        log = self.log
        types = self.types
        events = log.events[self.next_seq - log.base : self.last_readable() - log.base + 1]
        if types is None:
            return len(events)
        return sum(1 for event in events if event.type in types)

    def buffered(self) -> int:
        """Events waiting for this reader (after the losses its next read will announce)."""
        spilled = len(self.spill) if self.spill is not None else 0
        own = self._own_unread() if self.types is not None else max(0, self.backlog())
        return spilled + own - (self.overflow() if self.lossy else 0)

    def overflow(self) -> int:
        """How many more events this lossy reader will lose at its next read."""
        backlog = self.backlog()
        spilled = len(self.spill) if self.spill is not None else 0
        if backlog + spilled <= self.buffer_size:
            return 0
        # Without a filter every unread seq is one of its events.
        total = backlog if self.spill is None else spilled + self._own_unread()
        if total <= self.buffer_size:
            return 0
        return total - (1 if self.latest else self.buffer_size)

    def _drop_overflow(self) -> None:
        """Lose what no longer fits this lossy reader's buffer, oldest first."""
        log = self.log
        if self.spill is None:
            first = self.next_seq
            last = self.last_readable()
            start = max(first, log.base)
            if last - start + 1 > self.buffer_size:
                start = last if self.latest else last - self.buffer_size + 1
            if start > first:
                self._lose(first, start - 1, start - first)
                self.next_seq = start
            return
        excess = self.overflow()
        spill = self.spill
        while excess and spill:
            lost = spill.popleft()
            self._lose(lost.seq, lost.seq, 1)
            excess -= 1
        if not excess:
            return
        types = self.types
        assert types is not None
        position = self.next_seq - log.base
        events = log.events
        while excess:
            event = events[position]
            position += 1
            if event.type in types:
                self._lose(event.seq, event.seq, 1)
                excess -= 1
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
            if cursor.end_seq is None and not cursor.lossy and cursor.subscription is not exempt:
                bound = min(bound, cursor.next_seq + cursor.buffer_size - 1)
        return bound

    def has_room(self, count: int, exempt: Subscription | None = None) -> bool:
        """True when ``count`` more events fit every lossless reader; a reader whose buffer
        is smaller than ``count`` must have an empty one (the events go in together)."""
        seq = self.seq
        for cursor in self.cursors:
            if cursor.end_seq is None and not cursor.lossy and cursor.subscription is not exempt:
                size = cursor.buffer_size
                if seq + min(count, size) > cursor.next_seq + size - 1:
                    return False
        return True

    def has_unread(self) -> bool:
        """True while some cursor still has events of the current numbering to hand out."""
        return bool(self.events) or any(c.spill or c.missed for c in self.cursors)

    def skip_filtered(self) -> None:
        """Move each filtering cursor past the unread events its filter skips anyway.

        Readers are woken only for events they want; this keeps a lossless reader that
        waits for rarer types from holding the log (and its publishers) back.
        """
        for cursor in self.cursors:
            if cursor.types is not None:
                cursor.skip_filtered()

    def trim(self, counts: Counter[EventType]) -> None:
        """Drop the events no cursor still needs, counting their types into ``counts``.

        A lossy reader never holds more than its buffer size back: what it has not read by
        then is lost to it (a filtering one first keeps its own in its spill), and it hears
        so as a ``gap`` when it next reads.
        """
        keep_from = self.seq + 1
        for cursor in self.cursors:
            start = cursor.next_seq
            if cursor.lossy:
                start = max(start, self.seq - cursor.buffer_size + 1)
            keep_from = min(keep_from, start)
        drop = keep_from - self.base
        if drop > 0:
            for cursor in self.cursors:
                if cursor.spill is not None and cursor.next_seq < keep_from:
                    cursor._spill_before(keep_from)
            dropped = self.events[:drop]
            counts.update(map(_type_of, dropped))
            del self.events[:drop]
            self.base = keep_from

    def refresh_limit(self) -> None:
        """Recompute the fast-path limit after a trim or a change of readers."""
        longest_lossy = max((c.buffer_size for c in self.cursors if c.lossy), default=0)
        self.limit = min(
            self.lossless_bound(), self.base + max(longest_lossy, _TRIM_SLACK) + _TRIM_SLACK
        )

    def read(self, cursor: Cursor, limit: float) -> list[Event]:
        """Advance ``cursor`` and return at most ``limit`` items in order: a ``gap`` first
        if the reader lost events since its last read, then the events it wants."""
        if cursor.lossy:
            cursor._drop_overflow()
        batch: list[Event] = []
        if cursor.missed:
            batch.append(cursor._gap())
        spill = cursor.spill
        while spill and len(batch) < limit:
            batch.append(spill.popleft())
        if spill or len(batch) >= limit:
            return batch
        if batch:
            batch.extend(self._read_log(cursor, limit - len(batch)))
            return batch
        return self._read_log(cursor, limit)

    def _read_log(self, cursor: Cursor, limit: float) -> list[Event]:
        """Up to ``limit`` unread events of the log that pass the cursor's filter."""
        offset = cursor.next_seq - self.base
        stop = cursor.last_readable() - self.base + 1  # one past the last readable position
        types = cursor.types
        if types is None:
            if limit < stop - offset:
                stop = offset + int(limit)
            batch = self.events[offset:stop]
            cursor.next_seq += len(batch)
            return batch
        batch = []
        position = offset
        events = self.events
        while position < stop and len(batch) < limit:
            event = events[position]
            if event.type in types:
                batch.append(event)
            position += 1
        cursor.next_seq = self.base + position
        return batch
