"""The default runtime: the worker's job manager with the event store, the Prometheus
exporter and the resource monitor, and per-job checkpoint and controller subscribers.

Start-up order: the event store (so that it records every event from the first), the
exporter, the per-job ``seq`` counters restored from the store, the job manager, the resource
monitor. Shutdown: the manager checkpoints and pauses running jobs (they end
``interrupted``, resumable), then the monitor stops and the store writes what it holds.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import EventBus
from trainbus.sdk import finite
from trainbus.subscribers import (
    CheckpointInfo,
    CheckpointNotFound,
    EventStore,
    PrometheusExporter,
    ResourceMonitor,
    adopt_newest_checkpoint,
    checkpoint_path,
    latest_valid_state,
    list_checkpoints,
    verify_checkpoint,
)
from trainbus.worker import (
    DEFAULT_PRELOAD,
    DevicePool,
    JobManager,
    JobNotFound,
    JobSpec,
    ProgramSpec,
    RunSpec,
    WorkerLink,
    WorkerProcesses,
    WorkerSupervisor,
    device_slots,
    parse_job_spec,
)

from ._app import Runtime
from ._errors import Conflict, NotFound
from ._history import EventHistory
from ._job_subscribers import job_subscribers, run_subscribers, worker_subscribers
from ._local import read_server_url
from ._settings import Settings, device_entries
from ._tracking import check_trackers, tracker_subscribers

__all__ = ["ManagerJobs", "default_runtime", "job_subscribers"]

logger = logging.getLogger(__name__)


def worker_url(settings: Settings, job_id: str) -> str:
    """Where ``job_id``'s worker process connects: this server, over loopback when it
    listens on every interface."""
    base = read_server_url(settings.data_dir) if settings.port == 0 else None
    if base is None:
        host = settings.host
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        base = (
            f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"
        )
    return "ws" + base.removeprefix("http") + f"/jobs/{job_id}/worker"


def _worker_pids(supervisor: WorkerSupervisor) -> dict[str, int]:
    """``job_id -> pid`` of each running worker process (read off the event loop: a copy)."""
    return {
        job_id: run.process.pid
        for job_id, run in list(supervisor.runs.items())
        if run.process is not None
    }


def _latest_checkpoint(job_id: str, job_dir: Path) -> str | None:
    """At start-up: the job's newest valid checkpoint, which ``latest`` names from then on
    (None: it has none)."""
    return adopt_newest_checkpoint(job_dir)


def _pointed(job_dir: Path, alias: str) -> str | None:
    """The checkpoint ``latest`` or ``best`` names (None: the job has none)."""
    try:
        return checkpoint_path(job_dir, alias).name
    except CheckpointNotFound:
        return None


def _record(record: Any) -> dict[str, Any]:
    return dict(finite(record.model_dump(mode="json")))


class ManagerJobs:
    """The REST routes' view of the job manager, the event store and checkpoint files."""

    def __init__(
        self,
        manager: JobManager,
        store: EventStore,
        data_dir: Path,
        settings: Settings | None = None,
    ) -> None:
        self.manager = manager
        self.store = store
        self.data_dir = data_dir
        self.settings = settings

    def _job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    def _checkpoint_folder(self, job_id: str) -> Path:
        """The job's checkpoint folder, checked to lie in the data folder itself.

        :raises Conflict: if a symbolic link (job or checkpoint folder) leads out of it.
        """
        expected = self.data_dir.resolve() / "jobs" / job_id / "checkpoints"
        if (self._job_dir(job_id) / "checkpoints").resolve() != expected:
            raise Conflict(
                f"job {job_id!r}: its checkpoint folder is a symbolic link out of the data "
                "folder; the server does not follow it (remove the link)"
            )
        return expected

    @staticmethod
    def _own(folder: Path, infos: list[CheckpointInfo]) -> list[CheckpointInfo]:
        """The checkpoints whose state file is really in ``folder`` (no link leads out)."""
        return [
            info
            for info in infos
            if info.state_file.resolve() == folder / info.name / info.state_file.name
        ]

    async def submit(
        self, spec: JobSpec | ProgramSpec | Mapping[str, Any], idempotency_key: str | None = None
    ) -> tuple[dict[str, Any], bool]:
        spec = parse_job_spec(spec)
        if self.settings is not None and isinstance(spec, JobSpec):
            check_trackers(spec, self.settings)  # one that cannot run here is refused (422)
        record, created = await self.manager.submit_once(spec, idempotency_key=idempotency_key)
        return _record(record), created

    async def attach_run(self, spec: RunSpec) -> tuple[dict[str, Any], str, bool]:
        record, token, created = await self.manager.attach_run(spec)
        return _record(record), token, created

    async def get(self, job_id: str) -> dict[str, Any]:
        return _record(self.manager.get(job_id))

    async def exists(self, job_id: str) -> bool:
        try:
            self.manager.get(job_id)
        except JobNotFound:
            return False
        return True

    async def list_jobs(
        self, *, state: str | None, offset: int, limit: int
    ) -> tuple[list[dict[str, Any]], int]:
        records, total = self.manager.list(state, offset, limit)
        return [_record(r) for r in records], total

    async def drain(self) -> None:
        """Let running jobs save and end as interrupted (the server is about to stop)."""
        timeout = 30.0 if self.settings is None else self.settings.shutdown_timeout
        await self.manager.shutdown(timeout)

    def worker_link(self, job_id: str) -> WorkerLink | None:
        supervisor = self.manager.supervisor
        return None if supervisor is None else supervisor.link(job_id)

    async def command(self, job_id: str, kind: str, value: float | None = None) -> dict[str, Any]:
        if kind == "pause":
            command = self.manager.pause(job_id)
        elif kind == "stop":
            command = self.manager.stop(job_id)
        elif kind == "resume":
            command = await self.manager.resume(job_id)
        elif kind == "save":
            command = self.manager.save(job_id)
        elif kind == "set_lr" and value is not None:
            command = self.manager.set_lr(job_id, value)
        else:  # pragma: no cover - the routes send only these
            raise ValueError(f"unknown command {kind!r}")
        return {"command_id": command.id, "job_id": job_id, "command": command.kind.value}

    async def delete(self, job_id: str) -> None:
        last_seq = await self.manager.delete(job_id)
        # the store may not have written the job's last events yet: deleting before it has
        # would let them come back after the delete
        if not await EventHistory(self.store).wait_for(job_id, last_seq):
            logger.warning("job %s: event store behind at delete; late events may remain", job_id)
        await anyio.to_thread.run_sync(self.store.delete_job, job_id)

    async def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        self.manager.get(job_id)
        folder = self._checkpoint_folder(job_id)
        infos = await anyio.to_thread.run_sync(list_checkpoints, self._job_dir(job_id))
        marks = {alias: _pointed(self._job_dir(job_id), alias) for alias in ("latest", "best")}
        return [
            dict(finite({**info.to_dict(), **{m: info.name == n for m, n in marks.items()}}))
            for info in self._own(folder, infos)
        ]

    async def checkpoint_file(self, job_id: str, name: str) -> Path:
        self.manager.get(job_id)
        job_dir = self._job_dir(job_id)
        folder = self._checkpoint_folder(job_id)
        infos = await anyio.to_thread.run_sync(list_checkpoints, job_dir)
        # the name is looked up in the listing, never joined onto a path
        listed = {info.name: info for info in self._own(folder, infos)}
        wanted = (_pointed(job_dir, name) or "") if name in ("latest", "best") else name
        info = listed.get(wanted)
        if info is None:
            raise NotFound(
                f"job {job_id!r} has no checkpoint {name!r}: "
                f"list them with GET /jobs/{job_id}/checkpoints"
            )
        await anyio.to_thread.run_sync(verify_checkpoint, job_dir, info.name)
        return info.state_file

    def registry(self) -> dict[str, Any]:
        return self.manager.registry.describe()


@asynccontextmanager
async def default_runtime(settings: Settings, bus: EventBus) -> AsyncIterator[Runtime]:
    """Run the job side of the server on ``bus`` for the duration of the block."""
    data_dir = settings.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    store = EventStore(data_dir / "trainbus.db", keep_batch_events=settings.store_batch_events)
    await anyio.to_thread.run_sync(store.open)
    # Continue each job's numbering where the store left off (the manager does this for its
    # jobs too; the store also knows the server's own resource samples).
    for job_id in await anyio.to_thread.run_sync(store.job_ids):
        last = await anyio.to_thread.run_sync(store.last_seq, job_id)
        if last > bus.last_seq(job_id):
            bus.restore_sequence(job_id, last)
    store_handle = bus.attach(store)
    exporter = PrometheusExporter(bus=bus, retention_seconds=settings.metrics_retention_seconds)
    exporter_handle = bus.attach(exporter)

    async def durable(job_id: str, seq: int, session: str, number: int) -> None:
        # on the event loop, without a thread, for each message a worker sends, where it can
        if not store.mark_worker_nowait(job_id, seq, session, number):
            await anyio.to_thread.run_sync(store.mark_worker, job_id, seq, session, number)
        while True:
            with anyio.move_on_after(settings.store_catch_up_timeout):
                await store.wait_handled(job_id, seq)
                return
            logger.warning("the event store is behind: job %s's worker waits for it", job_id)

    supervisor = WorkerSupervisor(
        bus=bus,
        # the module of the workers' subscriber factory too: they find it by reference
        processes=WorkerProcesses(preload=(*DEFAULT_PRELOAD, worker_subscribers.__module__))
        if settings.run_jobs_in == "process"
        else None,
        url_for=partial(worker_url, settings),
        data_dir=data_dir,
        # the API token stays with the server: a worker holds its job's credential only
        subscriber_factory=partial(
            worker_subscribers, settings=settings.model_copy(update={"token": None})
        ),
        checkpoint_loader=latest_valid_state,
        stop_grace_seconds=settings.stop_grace_seconds,
        memory_limit_bytes=settings.worker_memory_limit_bytes,
        rendezvous=settings.distributed_rendezvous,
        durable=durable,
        mark_of=store.worker_mark,
    )
    devices = DevicePool(
        device_slots(
            device_entries(settings.devices),
            default_cpu_slots=settings.max_running_jobs,
            simulated_cuda=settings.simulated_cuda_devices,
        )
    )
    logger.info("device slots: %s", devices.describe())
    manager = JobManager(
        bus=bus,
        data_dir=data_dir,
        max_running=settings.max_running_jobs,
        devices=devices,
        supervisor=supervisor,
        run_subscriber_factory=partial(run_subscribers, bus=bus),
        run_lost_seconds=settings.run_lost_seconds,
        subscriber_factory=lambda handle: [
            *job_subscribers(handle, bus),
            *tracker_subscribers(handle, bus, settings),
        ],
        checkpoint_loader=latest_valid_state,
        latest_checkpoint=_latest_checkpoint,
        last_seq=store.last_seq,
        memory_limit=settings.job_memory_limit,
    )
    monitor = ResourceMonitor(
        bus=bus,
        interval_seconds=settings.resource_interval_seconds,
        workers=partial(_worker_pids, supervisor),
        ranks=supervisor.rank_pids,
    )
    try:
        async with manager, anyio.create_task_group() as group:
            group.start_soon(monitor.run)
            if supervisor.processes is not None:  # the fork server imports torch once
                group.start_soon(anyio.to_thread.run_sync, supervisor.processes.warm)
            try:
                yield Runtime(
                    jobs=ManagerJobs(manager, store, data_dir, settings),
                    history=store,
                    render_metrics=exporter.render,
                    metrics_registry=exporter.registry,
                    ready_checks={"job_manager": lambda: True, "event_store": lambda: True},
                )
            finally:
                with anyio.CancelScope(shield=True):
                    await manager.shutdown(settings.shutdown_timeout)
                group.cancel_scope.cancel()
    finally:
        with anyio.CancelScope(shield=True):
            await exporter_handle.detach()
            await store_handle.detach()  # writes everything published so far
            store.close()
