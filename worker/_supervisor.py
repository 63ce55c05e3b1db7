"""Runs each job in a worker process and watches over it: the job's credential and link, stop
escalation (the stop command, then SIGTERM, then SIGKILL), stall detection, and how the run
ended, from the worker's result or, when it died, from its exit and its last log lines."""

from __future__ import annotations

import logging
import secrets
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import ControlChannel, EventBus, EventType

from ._link import Item, WorkerLink
from ._processes import WorkerProcess, WorkerProcesses
from ._runs import CheckpointLoader
from ._trainer import Outcome, RunResult
from ._worker_process import EXIT_INTERRUPTED, WorkerFactory, WorkerSetup

__all__ = ["ProcessRun", "WorkerSupervisor"]

logger = logging.getLogger(__name__)

BeforePublish = Callable[[str, EventType], None]


@dataclass
class ProcessRun:
    """One run of a job in a worker process, as the supervisor tracks it."""

    job_id: str
    link: WorkerLink
    process: WorkerProcess | None = None
    stop_requested: anyio.Event = field(default_factory=anyio.Event)
    escalated: str | None = None
    """The signal the supervisor sent to end a stop that did not end in time."""
    stalled: bool = False


class WorkerSupervisor:
    """Starts job runs as worker processes and supervises them.

    :param url_for: ``job_id -> ws://.../jobs/<id>/worker``: where its worker connects.
    :param before_publish: called with each worker event's ``(job_id, type)`` before it is
        published (the job manager moves a record on ``job_paused`` first).
    :param stop_grace_seconds: how long a stop may take at a batch boundary before SIGTERM,
        and SIGTERM before SIGKILL.
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        processes: WorkerProcesses,
        url_for: Callable[[str], str],
        data_dir: Path,
        subscriber_factory: WorkerFactory | None = None,
        checkpoint_loader: CheckpointLoader | None = None,
        before_publish: BeforePublish | None = None,
        fit_epoch_end_timeout: float = 30.0,
        stop_grace_seconds: float = 30.0,
        memory_limit_bytes: int | None = None,
    ) -> None:
        self.bus = bus
        self.processes = processes
        self.url_for = url_for
        self.data_dir = data_dir
        self.subscriber_factory = subscriber_factory
        self.checkpoint_loader = checkpoint_loader
        self.before_publish = before_publish
        self.fit_epoch_end_timeout = fit_epoch_end_timeout
        self.stop_grace_seconds = stop_grace_seconds
        self.memory_limit_bytes = memory_limit_bytes
        self.runs: dict[str, ProcessRun] = {}

    def link(self, job_id: str) -> WorkerLink | None:
        """The link of ``job_id``'s current run (None: it has no worker process now)."""
        run = self.runs.get(job_id)
        return None if run is None else run.link

    def request_stop(self, job_id: str) -> None:
        """A stop was sent to the job: escalate if it does not end in time."""
        run = self.runs.get(job_id)
        if run is not None:
            run.stop_requested.set()

    def kill_all(self) -> None:
        """SIGKILL every worker still running (the server is going and they did not end)."""
        for run in self.runs.values():
            if run.process is not None:
                run.process.signal(signal.SIGKILL)

    async def _publish(self, job_id: str, items: list[Item]) -> None:
        if self.before_publish is not None:
            for item in items:
                self.before_publish(job_id, item[0])
        # on a thread: publish_many waits there for room when a lossless subscriber is behind,
        # which is how a slow server holds the worker back
        await anyio.to_thread.run_sync(self.bus.publish_many, job_id, items)

    async def run(
        self,
        job_id: str,
        spec: Mapping[str, Any],
        *,
        resumed: bool,
        control: ControlChannel,
        job_dir: Path,
        environment: Mapping[str, str] | None = None,
        stall_timeout: float | None = None,
        on_stall: str = "warn",
    ) -> tuple[RunResult, dict[str, Any]]:
        """Run one job in a worker process until it ends; its result and final progress."""
        token = secrets.token_urlsafe(32)
        link = WorkerLink(job_id, token, control, self._publish)
        run = self.runs[job_id] = ProcessRun(job_id, link)
        setup = WorkerSetup(
            job_id=job_id,
            spec=dict(spec),
            job_dir=job_dir,
            data_dir=self.data_dir,
            url=self.url_for(job_id),
            token=token,
            resumed=resumed,
            fit_epoch_end_timeout=self.fit_epoch_end_timeout,
            environment=dict(environment or {}),
            subscriber_factory=self.subscriber_factory,
            checkpoint_loader=self.checkpoint_loader,
            memory_limit_bytes=self.memory_limit_bytes,
        )
        try:
            process = run.process = await anyio.to_thread.run_sync(self.processes.start, setup)
            async with anyio.create_task_group() as group:
                group.start_soon(self._escalate_stop, run)
                if stall_timeout is not None:
                    group.start_soon(self._watch_stall, run, stall_timeout, on_stall)
                await process.wait()
                group.cancel_scope.cancel()
            return self._ended(run)
        finally:
            if self.runs.get(job_id) is run:
                del self.runs[job_id]

    def _ended(self, run: ProcessRun) -> tuple[RunResult, dict[str, Any]]:
        process = run.process
        assert process is not None
        result = run.link.result
        if result is not None:
            final: dict[str, Any] = {
                k: result[k] for k in ("epoch", "step", "metrics", "restarted") if k in result
            }
            return (
                RunResult(
                    Outcome(result["outcome"]),
                    stop_reason=result.get("stop_reason"),
                    error=result.get("error"),
                    details=dict(result.get("details") or {}),
                ),
                final,
            )
        how = process.describe_exit()
        if process.exitcode == EXIT_INTERRUPTED:
            reason = "the worker lost the server and ended the run with its state kept"
            return RunResult(Outcome.INTERRUPTED, stop_reason=reason), {}
        if run.stop_requested.is_set():
            reason = f"stopped: {how} after it did not stop within the grace period"
            return RunResult(Outcome.STOPPED, stop_reason=reason, details={"exit": how}), {}
        message = f"the job stalled and was ended: {how}" if run.stalled else how
        tail = process.stderr_tail()
        logger.error("job %s: %s", run.job_id, message)
        return (
            RunResult(
                Outcome.FAILED,
                error={
                    "type": "WorkerDied",
                    "message": message,
                    "exitcode": process.exitcode,
                    "stderr_tail": "\n".join(tail),
                },
            ),
            {},
        )

    async def _escalate_stop(self, run: ProcessRun) -> None:
        await run.stop_requested.wait()
        for signum in (signal.SIGTERM, signal.SIGKILL):
            await anyio.sleep(self.stop_grace_seconds)
            assert run.process is not None
            logger.warning(
                "job %s did not stop within %.0f s: sending %s",
                run.job_id, self.stop_grace_seconds, signal.Signals(signum).name,
            )  # fmt: skip
            run.escalated = signal.Signals(signum).name
            run.process.signal(signum)

    async def _watch_stall(self, run: ProcessRun, timeout: float, on_stall: str) -> None:
        link = run.link
        while True:
            await anyio.sleep(min(0.5, timeout / 4))
            quiet = time.monotonic() - link.last_progress
            if quiet < timeout:
                run.stalled = False
                continue
            if run.stalled:
                continue
            run.stalled = True
            stack = await self._stack_of(run)
            await self._publish_stall(run, quiet, stack, on_stall)
            if on_stall == "fail":
                assert run.process is not None
                run.process.signal(signal.SIGKILL)
                return

    async def _stack_of(self, run: ProcessRun) -> str:
        """Every thread's Python stack in the worker (faulthandler, on SIGUSR1)."""
        process = run.process
        assert process is not None
        path = process.setup.stack_path
        process.signal(signal.SIGUSR1)
        for _ in range(20):
            await anyio.sleep(0.05)
            try:
                text = path.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                return text[-8000:]
        return ""

    async def _publish_stall(
        self, run: ProcessRun, quiet: float, stack: str, on_stall: str
    ) -> None:
        link = run.link
        data = {
            "step": link.step,
            "epoch": link.epoch,
            "stalled_for_seconds": round(quiet, 1),
            "stack": stack,
            "action": on_stall,
        }
        logger.warning(
            "job %s stalled at step %d for %.0f s (%s)", run.job_id, link.step, quiet, on_stall
        )
        await self.bus.publish_async(run.job_id, EventType.JOB_STALLED, data)
