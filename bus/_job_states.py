"""The job lifecycle vocabulary every layer shares: a job's states, which of them mean its run
has ended, and the ``job_*`` event that announces each."""

from __future__ import annotations

from enum import StrEnum

from ._events import EventType

__all__ = ["ENDED_STATES", "TERMINAL_JOB_EVENT_TYPES", "JobState"]


class JobState(StrEnum):
    """Where a job is: ``queued -> running <-> paused -> completed | stopped | failed``, and
    ``interrupted`` for a job that was running when its server stopped."""

    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"

    @property
    def event_type(self) -> EventType:
        """The ``job_*`` event published when a job enters this state."""
        return _ENTERED_BY[self]


_ENTERED_BY = {
    JobState.QUEUED: EventType.JOB_QUEUED,
    JobState.RUNNING: EventType.JOB_STARTED,
    JobState.PAUSED: EventType.JOB_PAUSED,
    JobState.COMPLETED: EventType.JOB_COMPLETED,
    JobState.STOPPED: EventType.JOB_STOPPED,
    JobState.FAILED: EventType.JOB_FAILED,
    JobState.INTERRUPTED: EventType.JOB_INTERRUPTED,
}

ENDED_STATES: frozenset[JobState] = frozenset(
    {JobState.COMPLETED, JobState.STOPPED, JobState.FAILED, JobState.INTERRUPTED}
)
"""States with no run in progress: the job holds no slot and no tensors, and (but for
``completed``) can be resumed."""

TERMINAL_JOB_EVENT_TYPES: frozenset[EventType] = frozenset(
    state.event_type for state in (JobState.COMPLETED, JobState.STOPPED, JobState.FAILED)
)
"""Events that end a job's run with an outcome (``job_interrupted`` is the server stopping,
not the run)."""
