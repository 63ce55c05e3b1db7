"""Exceptions raised by the worker.

Hierarchy::

    JobError
    ├── JobNotFound        no job has that id                          (HTTP 404)
    ├── IllegalTransition  the job's state does not allow the request  (HTTP 409)
    ├── KeyConflict        a client-chosen key names another job       (HTTP 409)
    ├── SpecError          a job spec is invalid beyond its schema     (HTTP 422)
    │   └── DatasetError   a dataset cannot be found or read           (HTTP 422)
    └── ManagerClosed      the job manager is shutting down            (HTTP 503)
"""

from __future__ import annotations

__all__ = [
    "DatasetError",
    "IllegalTransition",
    "JobError",
    "JobNotFound",
    "KeyConflict",
    "ManagerClosed",
    "SpecError",
]


class JobError(Exception):
    """Base class of every error the worker raises."""


class JobNotFound(JobError, LookupError):
    """Raised when no job has the given id."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id {job_id!r}")


class IllegalTransition(JobError):
    """Raised when a job's state does not allow the requested change."""

    def __init__(self, job_id: str, state: str, action: str, allowed_from: list[str]) -> None:
        self.job_id = job_id
        self.state = state
        self.action = action
        self.allowed_from = allowed_from
        super().__init__(
            f"cannot {action} job {job_id!r}: it is {state}; "
            f"{action} is allowed when the job is {' or '.join(allowed_from)}"
        )


class KeyConflict(JobError):
    """Raised when an Idempotency-Key comes back with another job spec than its first use."""


class SpecError(JobError, ValueError):
    """Raised when a job spec is invalid in a way its schema cannot express."""


class DatasetError(SpecError):
    """Raised when a dataset cannot be found or read."""


class ManagerClosed(JobError):
    """Raised when a request reaches a job manager that is shutting down."""
