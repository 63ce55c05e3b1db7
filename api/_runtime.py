"""The default runtime: the worker's job manager with the event store, the Prometheus
exporter and the resource monitor, and per-job checkpoint and controller subscribers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from bus import EventBus

from ._app import Runtime
from ._settings import Settings

__all__ = ["default_runtime", "exception_statuses"]


def exception_statuses() -> dict[type[BaseException], int]:
    """HTTP statuses for the worker's and subscribers' exceptions."""
    return {}


@asynccontextmanager
async def default_runtime(settings: Settings, bus: EventBus) -> AsyncIterator[Runtime]:
    raise NotImplementedError("waiting for worker.JobManager")
    yield  # pragma: no cover
