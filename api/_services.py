"""What the routes use, built by the app's lifespan and kept on ``app.state.services``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from fastapi import Request
from starlette.requests import HTTPConnection

from trainbus.bus import EventBus
from trainbus.worker import JobSpec, ProgramSpec, RunSpec, WorkerLink

from ._errors import ServiceUnavailable
from ._history import EventHistory
from ._hub import EventHub
from ._settings import Settings

__all__ = ["JobService", "Services", "has_events", "services_of"]


class JobService(Protocol):
    """The job operations the REST routes need (implemented over ``trainbus.worker.JobManager``).

    Records are plain JSON-ready mappings (see :class:`trainbus.api._schemas.JobRecord`).
    """

    async def submit(
        self, spec: JobSpec | ProgramSpec, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        """The job's record, and whether this call created it (False: the key's job)."""
        ...

    async def attach_run(self, spec: RunSpec) -> tuple[dict[str, Any], str, bool]:
        """Create or attach to an SDK run's job: its record, the attaching process's
        credential, and whether the job was created."""
        ...

    async def get(self, job_id: str) -> dict[str, Any]: ...

    async def exists(self, job_id: str) -> bool: ...

    async def list_jobs(
        self, *, state: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]: ...

    async def command(
        self, job_id: str, kind: str, value: float | None = None
    ) -> dict[str, Any]: ...

    async def delete(self, job_id: str) -> None: ...

    async def checkpoints(self, job_id: str) -> list[dict[str, Any]]: ...

    async def checkpoint_file(self, job_id: str, name: str) -> Path: ...

    def registry(self) -> dict[str, Any]: ...

    def worker_link(self, job_id: str) -> WorkerLink | None:
        """The server's end of the job's worker connection (None: no worker process runs
        it now, or jobs run on threads)."""
        ...


@dataclass
class Services:
    """The server's running parts."""

    settings: Settings
    bus: EventBus
    hub: EventHub
    jobs: JobService
    history: EventHistory | None = None
    render_metrics: Callable[[], bytes] | None = None
    ready_checks: dict[str, Callable[[], Any]] = field(default_factory=dict)
    accepting: bool = True
    shutting_down: bool = False


async def has_events(services: Services, job_id: str) -> bool:
    """True for a job the manager knows, or any id with events (such as ``_server``, whose
    events are the machine's resource samples).

    The bus is asked first: it answers from memory for any job with events since start-up,
    where the manager reads and validates the job's whole record from SQLite (every WebSocket
    handshake asks, twice)."""
    if services.bus.last_seq(job_id) > 0 or await services.jobs.exists(job_id):
        return True
    return services.history is not None and await services.history.last_seq(job_id) > 0


def services_of(connection: HTTPConnection | Request) -> Services:
    """The services of the app serving ``connection``.

    :raises ServiceUnavailable: before start-up finished or after shutdown began.
    """
    services: Services | None = getattr(connection.app.state, "services", None)
    if services is None:
        raise ServiceUnavailable("the server is starting; retry in a moment")
    return services
