"""Every job's log and ``seq`` counter, and which subscriptions follow which job.

The bus keeps one :class:`JobLogs` and calls it with its lock held.
"""

from __future__ import annotations

from collections import Counter

from ._errors import BusError
from ._events import EventType
from ._log import JobLog
from ._subscription import Subscription

__all__ = ["JobLogs"]


class JobLogs:
    """The logs of the jobs the bus has seen, the live subscriptions, and the types of the
    events trimmed from the logs (for the published counts)."""

    def __init__(self) -> None:
        self.by_job: dict[str, JobLog] = {}
        self.subscriptions: list[Subscription] = []
        self.trimmed_counts: Counter[EventType] = Counter()

    def start(self, job_id: str) -> JobLog:
        """Start ``job_id``'s log, followed by every matching subscription."""
        log = self.by_job[job_id] = JobLog(job_id)
        for subscription in self.subscriptions:
            if subscription.job_id is None or subscription.job_id == job_id:
                subscription.follow(log)
        log.refresh_limit()
        return log

    def add(self, subscription: Subscription) -> None:
        """Let ``subscription`` follow the jobs it wants, from their next event on."""
        self.subscriptions.append(subscription)
        job_id = subscription.job_id
        if job_id is None:
            logs = list(self.by_job.values())
        else:
            logs = [self.by_job.get(job_id) or self.start(job_id)]
        for log in logs:
            subscription.follow(log)
            log.refresh_limit()

    def remove(self, subscription: Subscription) -> bool:
        """True if ``subscription`` was live (it no longer follows new jobs)."""
        if subscription not in self.subscriptions:
            return False
        self.subscriptions.remove(subscription)
        return True

    def last_seq(self, job_id: str) -> int:
        log = self.by_job.get(job_id)
        return 0 if log is None else log.seq

    def restore(self, job_id: str, last_seq: int) -> None:
        """Continue ``job_id``'s numbering after ``last_seq``; see ``EventBus.restore_sequence``."""
        log = self.by_job.get(job_id) or self.start(job_id)
        if last_seq < log.seq:
            raise BusError(
                f"cannot move job {job_id!r} back to seq {last_seq}: "
                f"seq {log.seq} was already published"
            )
        log.trim(self.trimmed_counts)
        if log.has_unread():
            raise BusError(f"cannot renumber job {job_id!r} while its events are unread")
        log.seq = last_seq
        log.base = last_seq + 1
        for cursor in log.cursors:
            cursor.next_seq = last_seq + 1
        log.refresh_limit()

    def forget(self, job_id: str) -> bool:
        """Drop ``job_id``'s log and its unread events; True if there was one."""
        log = self.by_job.pop(job_id, None)
        if log is None:
            return False
        self.trimmed_counts.update(event.type for event in log.events)
        for cursor in list(log.cursors):
            cursor.subscription.unfollow(job_id)
        return True

    def published_marker(self) -> int:
        """A number that changes whenever an event is published."""
        return sum(log.seq for log in self.by_job.values())

    def published_counts(self) -> Counter[EventType]:
        """How many events of each type were published (trimmed or still in a log)."""
        counts = Counter(self.trimmed_counts)
        for log in self.by_job.values():
            counts.update(event.type for event in log.events)
        return counts
