"""Stand-ins for the job side, for tests of the transport (auth, hub, streaming) alone."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio

from trainbus.api import Runtime, Settings
from trainbus.api._errors import NotFound
from trainbus.bus import DeliveryPolicy, Event, EventBus, EventType, event_type_for
from trainbus.worker import JobSpec


class MemoryHistory:
    """Every event of the bus, kept in memory by a lossless subscription."""

    def __init__(self) -> None:
        self.events: dict[str, list[Event]] = {}

    async def run(self, bus: EventBus, *, task_status: Any = anyio.TASK_STATUS_IGNORED) -> None:
        async with bus.subscribe(
            "memory_history", buffer_size=100_000, policy=DeliveryPolicy.LOSSLESS
        ) as subscription:
            task_status.started()
            async for event in subscription:
                self.events.setdefault(event.job_id, []).append(event)

    def read(
        self,
        job_id: str,
        after_seq: int = 0,
        types: Iterable[EventType | str] | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        wanted = None if types is None else {event_type_for(t) for t in types}
        selected = [
            e
            for e in self.events.get(job_id, [])
            if e.seq > after_seq and (wanted is None or e.type in wanted)
        ]
        return selected if limit is None else selected[:limit]

    def last_seq(self, job_id: str) -> int:
        events = self.events.get(job_id)
        return events[-1].seq if events else 0


class FakeJobs:
    """Records jobs without running them; tests publish their events onto the bus."""

    def __init__(self) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self._ids = itertools.count(1)

    def add(self, job_id: str) -> None:
        self.records[job_id] = {"id": job_id, "state": "running", "spec": {}, "created_at": 0.0}

    async def submit(
        self, spec: JobSpec, idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        job_id = f"fake-{next(self._ids)}"
        self.records[job_id] = {
            "id": job_id,
            "state": "queued",
            "spec": spec.model_dump(mode="json"),
            "created_at": 0.0,
        }
        return self.records[job_id], True

    async def attach_run(self, spec: Any) -> tuple[dict[str, Any], str, bool]:
        job_id = f"run-{spec.run_id}"
        created = job_id not in self.records
        if created:
            self.records[job_id] = {
                "id": job_id,
                "state": "running",
                "spec": spec.model_dump(mode="json"),
                "created_at": 0.0,
            }
        return self.records[job_id], "fake-worker-token", created

    async def get(self, job_id: str) -> dict[str, Any]:
        if job_id not in self.records:
            raise NotFound(f"job {job_id!r} does not exist")
        return self.records[job_id]

    async def exists(self, job_id: str) -> bool:
        return job_id in self.records

    async def list_jobs(
        self, *, state: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        items = [r for r in self.records.values() if state is None or r["state"] == state]
        return items[offset : offset + limit], len(items)

    def worker_link(self, job_id: str) -> None:
        return None  # the fake runs no worker processes

    async def command(
        self, job_id: str, kind: str, value: float | None = None
    ) -> dict[str, Any]:
        await self.get(job_id)
        return {"command_id": "c1", "job_id": job_id, "command": kind}

    async def delete(self, job_id: str) -> None:
        await self.get(job_id)
        del self.records[job_id]

    async def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        await self.get(job_id)
        return []

    async def checkpoint_file(self, job_id: str, name: str) -> Path:
        raise NotFound(f"job {job_id!r} has no checkpoint {name!r}")

    def registry(self) -> dict[str, Any]:
        return {"models": {}, "datasets": {}}


def fake_runtime(jobs: FakeJobs, history: MemoryHistory | None):
    @asynccontextmanager
    async def factory(settings: Settings, bus: EventBus) -> AsyncIterator[Runtime]:
        async with anyio.create_task_group() as group:
            if history is not None:
                await group.start(history.run, bus)
            yield Runtime(jobs=jobs, history=history, render_metrics=lambda: b"# fake\n")
            group.cancel_scope.cancel()

    return factory
