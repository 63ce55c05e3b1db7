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

from trainbus.bus import ControlChannel, Event, EventBus, EventType
from trainbus.sdk import ProtocolError, decode

from ._distributed import EXIT_HOSTS_MISSING, EXIT_RANK_FAILED, hosts_rendezvous, rank_failure
from ._link import Durable, Item, WorkerLink, events_after
from ._processes import WorkerProcess, WorkerProcesses
from ._rank_progress import rank_pids, stalled_ranks
from ._runs import CheckpointLoader
from ._trainer import Outcome, RunResult
from ._unconfirmed import read_unconfirmed, set_aside_unconfirmed, wait_worker_gone
from ._worker_process import EXIT_INTERRUPTED, SERVER_GONE_GRACE, WorkerFactory, WorkerSetup

__all__ = ["ProcessRun", "WorkerSupervisor"]

logger = logging.getLogger(__name__)

BeforePublish = Callable[[str, EventType], None]

_OUT_OF_MEMORY = ("MemoryError", "Cannot allocate memory", "std::bad_alloc")
"""What a worker's last log lines hold when it died for want of memory under its limit."""


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
    stalled_ranks: str | None = None
    """Of a distributed job that stalled: which rank held the others up, and how."""
    sdk: bool = False
    """An SDK run: its process is the user's, not the supervisor's."""
    released: anyio.Event = field(default_factory=anyio.Event)
    """An SDK run let go by a server that shuts down: its process goes on and attaches again."""
    rendezvous: str | None = None
    """Of a distributed job on several hosts: where the other hosts' agents join."""
    run_key: str = field(default_factory=lambda: secrets.token_hex(6))
    """Tells this run from the job's other runs (an agent joins each run once)."""
    stopped_unjoined: bool = False
    """Stopped while still waiting for its other hosts: its agent was killed at once."""


class WorkerSupervisor:
    """Starts job runs as worker processes and supervises them.

    :param url_for: ``job_id -> ws://.../jobs/<id>/worker``: where its worker connects.
    :param before_publish: called with each worker event's ``(job_id, type)`` before it is
        published (the job manager moves a record on ``job_paused`` first).
    :param stop_grace_seconds: how long a stop may take at a batch boundary before SIGTERM,
        and SIGTERM before SIGKILL.
    :param processes: where worker processes come from (None: this supervisor only follows
        SDK runs, whose processes are the users').
    :param rendezvous: ``host:port`` where a distributed job's ranks meet (port 0: a free one).
    :param durable: acknowledges a worker's events only once the event store holds them
        (see ``worker/_link.py``); ``mark_of`` reads back how far it holds a job's worker.
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        processes: WorkerProcesses | None,
        url_for: Callable[[str], str],
        data_dir: Path,
        subscriber_factory: WorkerFactory | None = None,
        checkpoint_loader: CheckpointLoader | None = None,
        before_publish: BeforePublish | None = None,
        fit_epoch_end_timeout: float = 30.0,
        stop_grace_seconds: float = 30.0,
        memory_limit_bytes: int | None = None,
        durable: Durable | None = None,
        mark_of: Callable[[str], tuple[str, int] | None] | None = None,
        rendezvous: str = "localhost:0",
    ) -> None:
        self.rendezvous = rendezvous
        self.bus = bus
        self.durable = durable
        self.mark_of = mark_of
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

    def release_runs(self) -> set[str]:
        """Let every SDK run go (the server is shutting down): each ends ``interrupted`` now,
        and its process, which is the user's and goes on training, attaches again when the
        server is back. The ids of the runs let go."""
        released = {job_id for job_id, run in self.runs.items() if run.sdk}
        for job_id in released:
            self.runs[job_id].released.set()
        return released

    def kill_all(self) -> None:
        """SIGKILL every worker still running (the server is going and they did not end)."""
        for run in self.runs.values():
            if run.process is not None:
                run.process.signal(signal.SIGKILL)

    async def _publish(self, job_id: str, items: list[Item]) -> list[Event]:
        if self.before_publish is not None:
            for item in items:
                self.before_publish(job_id, item[0])
        published = self.bus.try_publish_many(job_id, items)
        if published is not None:
            return published
        # a lossless subscriber is behind: wait for room on a thread, which is how a slow
        # server holds the worker back
        return await anyio.to_thread.run_sync(self.bus.publish_many, job_id, items)

    async def take_unconfirmed(self, job_id: str, job_dir: Path) -> dict[str, Any]:
        """Publish the events a worker that lost its server kept in the job's folder
        (``worker/_unconfirmed.py``), once that worker has ended, skipping what the store
        holds already; the progress the worker's run ended with (``{"step": ...}``; empty
        when it kept nothing). Call it before the job's next run starts."""
        # the worker ends within its grace period; a second more for a slow disk
        if not await anyio.to_thread.run_sync(wait_worker_gone, job_dir, SERVER_GONE_GRACE + 1):
            logger.warning("job %s: a worker of an earlier run still holds its lock", job_id)
            return {}
        lines = await anyio.to_thread.run_sync(read_unconfirmed, job_dir)
        if not lines:
            return {}
        published = 0
        try:
            header = decode(lines[0])
            worker = header.get("worker")
            if header.get("type") != "unconfirmed" or header.get("job_id") != job_id:
                raise ProtocolError("the file's header names no worker process of this job")
            mark = self.mark_of(job_id) if self.mark_of is not None else None
            stored = mark[1] if mark is not None and mark[0] == worker else 0
            for line in lines[1:]:
                items, last = events_after(decode(line), stored)
                if not items:
                    continue
                events = await self._publish(job_id, items)
                stored = last
                if self.durable is not None:
                    await self.durable(job_id, events[-1].seq, str(worker), stored)
                published += len(items)
        except ProtocolError as error:
            logger.warning("job %s: its unconfirmed events are unreadable: %s", job_id, error)
            await anyio.to_thread.run_sync(lambda: set_aside_unconfirmed(job_dir, unreadable=True))
            return {}
        await anyio.to_thread.run_sync(set_aside_unconfirmed, job_dir)
        logger.info(
            "job %s: %d events its worker kept without a server are stored", job_id, published
        )
        step = header.get("step")
        return {"step": step} if isinstance(step, int) else {}

    async def _steered(self, event: Event) -> None:
        await anyio.to_thread.run_sync(
            lambda: self.bus.wait_processed(event, self.fit_epoch_end_timeout, steering_only=True)
        )

    def _new_link(self, job_id: str, control: ControlChannel) -> tuple[WorkerLink, str]:
        token = secrets.token_urlsafe(32)
        mark = self.mark_of(job_id) if self.mark_of is not None else None
        link = WorkerLink(
            job_id,
            token,
            control,
            self._publish,
            durable=self.durable,
            steered=self._steered,
            mark=mark,
        )
        return link, token

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
        if self.processes is None:
            raise RuntimeError("this server starts no worker processes (run_jobs_in: thread)")
        link, token = self._new_link(job_id, control)
        run = self.runs[job_id] = ProcessRun(job_id, link)
        run.rendezvous = hosts_rendezvous(spec, self.rendezvous)
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
            rendezvous=run.rendezvous or self.rendezvous,
            memory_limit_bytes=self._memory_limit(job_id, spec, environment or {}),
        )
        try:
            process = run.process = await anyio.to_thread.run_sync(self.processes.start, setup)
            async with anyio.create_task_group() as group:
                group.start_soon(self._escalate_stop, run)
                if stall_timeout is not None:
                    group.start_soon(self._watch_stall, run, stall_timeout, on_stall)
                await process.wait()
                group.cancel_scope.cancel()
            kept: dict[str, Any] = {}
            if process.exitcode == EXIT_INTERRUPTED and link.result is None:
                kept = await self.take_unconfirmed(job_id, job_dir)  # it lost its link
            result, final = self._ended(run)
            return result, {**kept, **final}
        finally:
            if self.runs.get(job_id) is run:
                del self.runs[job_id]

    def _memory_limit(
        self, job_id: str, spec: Mapping[str, Any], environment: Mapping[str, str]
    ) -> int | None:
        """The server's limit on a worker's address space, or the job's where it is lower;
        none for a job that sees a CUDA device, whose driver reserves far more address space
        than it uses and fails to start under such a limit."""
        asked = spec.get("memory_limit_mb")
        limits = [self.memory_limit_bytes, asked * 2**20 if isinstance(asked, int) else None]
        limit = min((limit for limit in limits if limit is not None), default=None)
        cuda = environment.get("CUDA_VISIBLE_DEVICES") or str(spec.get("device")).startswith("cuda")
        if limit is not None and cuda:
            logger.warning(
                "job %s runs on CUDA: its worker's address space is not limited (the CUDA "
                "driver reserves far more than it uses)", job_id,
            )  # fmt: skip
            return None
        return limit

    # -- SDK runs: the process is the user's ------------------------------------------------

    def attach(self, job_id: str, control: ControlChannel) -> str:
        """Let an SDK process attach to ``job_id``; returns its credential. A process that
        attaches while an older one is attached takes over (the older one is let go)."""
        run = self.runs.get(job_id)
        if run is not None:
            token = secrets.token_urlsafe(32)
            run.link.replace_token(token)
            return token
        link, token = self._new_link(job_id, control)
        self.runs[job_id] = ProcessRun(job_id, link, sdk=True)
        return token

    async def follow(
        self,
        job_id: str,
        *,
        lost_after: float,
        stall_timeout: float | None = None,
        on_stall: str = "warn",
    ) -> tuple[RunResult, dict[str, Any]]:
        """Wait until the attached SDK run of ``job_id`` ends: its result; interrupted when
        no process of it has been connected for ``lost_after`` seconds; stopped when it does
        not answer a stop within two grace periods; failed when it stalls with ``on_stall:
        fail`` (the process is the user's: the server cannot signal it)."""
        run = self.runs[job_id]
        try:
            async with anyio.create_task_group() as group:
                if stall_timeout is not None:
                    group.start_soon(self._watch_stall, run, stall_timeout, on_stall)
                ended = await self._sdk_end(run, lost_after, on_stall)
                group.cancel_scope.cancel()
            return ended
        finally:
            if self.runs.get(job_id) is run:
                del self.runs[job_id]

    async def _sdk_end(
        self, run: ProcessRun, lost_after: float, on_stall: str
    ) -> tuple[RunResult, dict[str, Any]]:
        link = run.link
        clock = time.monotonic
        away_since: float | None = clock()
        stop_at: float | None = None
        while link.result is None:
            await anyio.sleep(0.1)
            now = clock()
            away_since = None if link.connected else (away_since or now)
            if away_since is not None and now - away_since > lost_after:
                reason = (
                    f"the run stopped reporting: no process of it connected for {lost_after:.0f} s"
                )
                return RunResult(Outcome.INTERRUPTED, stop_reason=reason), {}
            if run.released.is_set():
                reason = "the server shut down; the run's process attaches again when it is back"
                return RunResult(Outcome.INTERRUPTED, stop_reason=reason), {}
            if run.stop_requested.is_set():
                stop_at = stop_at or now
                if now - stop_at > 2 * self.stop_grace_seconds:
                    reason = "stopped: the run did not answer the stop within the grace period"
                    return RunResult(Outcome.STOPPED, stop_reason=reason), {}
            if run.stalled and on_stall == "fail":
                message = f"the run stalled at step {link.step} and on_stall is fail"
                error = {"type": "Stalled", "message": message}
                return RunResult(Outcome.FAILED, error=error), {}
        return self._from_result(link.result)

    @staticmethod
    def _from_result(result: dict[str, Any]) -> tuple[RunResult, dict[str, Any]]:
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

    def _ended(self, run: ProcessRun) -> tuple[RunResult, dict[str, Any]]:
        process = run.process
        assert process is not None
        result = run.link.result
        if result is not None:
            return self._from_result(result)
        how = process.describe_exit()
        if process.exitcode == EXIT_INTERRUPTED:
            reason = "the worker lost the server and ended the run with its state kept"
            return RunResult(Outcome.INTERRUPTED, stop_reason=reason), {}
        if run.stopped_unjoined:
            reason = "stopped before the agents of the job's other hosts had all joined"
            return RunResult(Outcome.STOPPED, stop_reason=reason, details={"exit": how}), {}
        if run.stop_requested.is_set():
            reason = f"stopped: {how} after it did not stop within the grace period"
            return RunResult(Outcome.STOPPED, stop_reason=reason, details={"exit": how}), {}
        tail = process.stderr_tail()
        error: dict[str, Any] = {"type": "WorkerDied", "exitcode": process.exitcode}
        if process.exitcode == EXIT_HOSTS_MISSING:  # a job on several hosts: who is missing
            how = rank_failure(process.setup.job_dir) or how
            error["type"] = "HostsMissing"
        if process.exitcode == EXIT_RANK_FAILED:  # a distributed job's agent: which rank
            how = rank_failure(process.setup.job_dir) or how
            error["type"] = "RankFailed"
            behind = run.stalled_ranks or stalled_ranks(process.setup.job_dir)
            if behind:  # the rank that failed first may only have waited for this one
                how = f"{how}; {behind}"
                error["stalled_ranks"] = behind
        fatal = process.fatal_error() if (process.exitcode or 0) < 0 else []
        frames = [line.strip() for line in fatal if line.lstrip().startswith("File ")]
        if frames:  # where the native crash hit the Python code
            how = f"{how}, at {frames[0]}"
            error["fatal_error"] = "\n".join(fatal)
        limit = process.setup.memory_limit_bytes
        if limit is not None and any(word in line for line in tail for word in _OUT_OF_MEMORY):
            how = f"the job exceeded its memory limit of {limit / 2**20:.0f} MiB: {how}"
            error.update(type="MemoryLimitExceeded", memory_limit_bytes=limit)
        if run.stalled:
            behind = f" ({run.stalled_ranks})" if run.stalled_ranks else ""
            how = f"the job stalled and was ended{behind}: {how}"
        logger.error("job %s: %s", run.job_id, how)
        error.update(message=how, stderr_tail="\n".join(tail))
        return RunResult(Outcome.FAILED, error=error), {}

    async def _escalate_stop(self, run: ProcessRun) -> None:
        await run.stop_requested.wait()
        if run.rendezvous is not None and not run.link.ever_connected:
            # a job on several hosts still waiting for them has no step to stop at, and its
            # agent, blocked in the rendezvous, takes no SIGTERM until the join times out
            assert run.process is not None
            run.stopped_unjoined = True
            run.process.signal(signal.SIGKILL)
            return
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
        # from now, when the worker has started: the wait for a fork server still importing
        # torch (seconds, for a server's first jobs) is no stall
        started = time.monotonic()
        while True:
            await anyio.sleep(min(0.5, timeout / 4))
            quiet = time.monotonic() - max(link.last_progress, started)
            if quiet < timeout:
                run.stalled = False
                continue
            if run.stalled:
                continue
            run.stalled = True
            assert run.process is not None
            if run.process.setup.spec.get("distributed"):
                for _ in range(5):  # the ranks write their progress once a second
                    run.stalled_ranks = stalled_ranks(run.process.setup.job_dir)
                    if run.stalled_ranks:
                        break
                    await anyio.sleep(0.5)
            stack = await self._stack_of(run)
            await self._publish_stall(run, quiet, stack, on_stall)
            if on_stall == "fail":
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

    def rendezvous_of(self, job_id: str) -> dict[str, str] | None:
        """Where the other hosts' agents of ``job_id``'s current run join, ``{"endpoint":
        "host:port", "run": key}`` (None: it runs on one host, or not now)."""
        run = self.runs.get(job_id)
        if run is None or run.rendezvous is None:
            return None
        return {"endpoint": run.rendezvous, "run": run.run_key}

    def rank_pids(self) -> dict[str, dict[int, int]]:
        """``job_id -> rank -> pid`` of the ranks of each running distributed job (blocking:
        it reads the ranks' progress files)."""
        ranks = {}
        for job_id, run in list(self.runs.items()):
            process = run.process
            if process is not None and process.setup.spec.get("distributed"):
                ranks[job_id] = rank_pids(process.setup.job_dir)
        return ranks

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
        if run.stalled_ranks:
            data["ranks"] = run.stalled_ranks
        logger.warning(
            "job %s stalled at step %d for %.0f s (%s)%s",
            run.job_id, link.step, quiet, on_stall,
            f": {run.stalled_ranks}" if run.stalled_ranks else "",
        )  # fmt: skip
        await self.bus.publish_async(run.job_id, EventType.JOB_STALLED, data)
