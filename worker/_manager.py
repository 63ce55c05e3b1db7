"""The job manager: creates jobs from specs, queues them FIFO under a concurrency limit, runs
each on its own thread with its subscribers attached, and keeps their records."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskGroup

from trainbus.bus import (
    ENDED_STATES,
    Command,
    CommandKind,
    ControlChannel,
    ControlError,
    Event,
    EventBus,
    EventType,
    JobState,
    Subscriber,
    SubscriberHandle,
)

from ._building import check_runtime
from ._devices import DevicePool, DeviceSlot
from ._errors import IllegalTransition, JobNotFound, KeyConflict, ManagerClosed, SpecError
from ._memory import estimate_memory, format_bytes
from ._program_spec import ProgramSpec, is_program_spec, parse_job_spec
from ._records import TRANSITIONS, JobFailure, JobRecord, JobStore
from ._registry import Registry, default_registry
from ._run_spec import RunSpec, is_run_spec
from ._runs import (
    CheckpointLoader,
    release_memory,
    restore_state,
    run_and_keep_state,
)
from ._spec import JobSpec
from ._trainer import Outcome, RunResult, Trainer

if TYPE_CHECKING:
    from ._supervisor import WorkerSupervisor

__all__ = ["JobHandle", "JobManager"]

logger = logging.getLogger(__name__)

SubscriberFactory = Callable[["JobHandle"], Sequence[Subscriber]]
RunSubscriberFactory = Callable[[str, RunSpec | ProgramSpec, ControlChannel], Sequence[Subscriber]]
CheckpointNamer = Callable[[str, Path], "str | None"]

_LIVE_STATES = frozenset({JobState.RUNNING, JobState.PAUSED})
_COMMAND_MOVES = {  # applied command -> (the record's state before, after)
    EventType.JOB_PAUSED: (JobState.RUNNING, JobState.PAUSED),
    EventType.JOB_RESUMED: (JobState.PAUSED, JobState.RUNNING),
}
_OUTCOME_STATES = {
    Outcome.COMPLETED: JobState.COMPLETED,
    Outcome.STOPPED: JobState.STOPPED,
    Outcome.FAILED: JobState.FAILED,
    Outcome.INTERRUPTED: JobState.INTERRUPTED,
}


class JobHandle:
    """One job as the subscriber factory sees it: ``id``, ``spec``, ``control``, ``job_dir``
    (``<data>/jobs/<id>``, also as ``data_dir``) and ``trainer``, built before the factory is
    called so that subscribers can ``add_callback`` and ``register_stateful`` on it."""

    def __init__(self, job_id: str, spec: JobSpec, job_dir: Path, control: ControlChannel) -> None:
        self.id = job_id
        self.spec = spec
        self.job_dir = job_dir
        self.control = control
        self.trainer: Trainer | None = None

    @property
    def data_dir(self) -> Path:
        """The job's folder (ARCHITECTURE.md's name for :attr:`job_dir`)."""
        return self.job_dir


class JobManager:
    """Runs jobs; use it as an async context manager.

    :param bus: where jobs publish.
    :param data_dir: holds ``trainbus.db`` and ``jobs/<id>/``.
    :param max_running: jobs running (or paused) at once; the rest wait in FIFO order.
    :param subscriber_factory: per-job subscribers, attached for each run and drained after.
    :param checkpoint_loader: ``(job_id, job_dir) -> state or None``, to resume a job whose
        trainer is no longer in memory (after a restart).
    :param latest_checkpoint: ``(job_id, job_dir) -> name or None``, the job's newest complete
        checkpoint: a crash can come between checkpoint retention and the record learning
        the newer name, so the record of a job interrupted that way is put right at start-up.
    :param last_seq: ``job_id -> last stored seq``, to continue each job's numbering.
    :param registry: models and datasets (default: built-ins plus installed plugins).
    :param fit_epoch_end_timeout: how long a trainer waits at each ``fit_epoch_end`` for
        lossless subscribers (controllers) to handle it.
    :param memory_limit: bytes one job may take (its spec's estimate, ``worker/_memory.py``);
        a job estimated above it is refused at submission. None: no limit.
    :param run_subscriber_factory: ``(job_id, spec, control)`` -> the server-side subscribers
        of an SDK run (its controllers: the run's process is the user's).
    :param run_lost_seconds: an SDK run none of whose processes has been connected this long
        ends interrupted (it resumes when a process of it attaches again).
    :param supervisor: runs each job in a worker process of its own (the server's way);
        None runs each on a thread of this process, with ``subscriber_factory``'s subscribers
        on ``bus`` (the library's way, and tests').
    :param devices: the device slots jobs hold while they run (``worker/_devices.py``): a
        queued job starts once its slots are free, and never ahead of an earlier queued job
        that waits for slots of the same kind; its worker process sees only its CUDA devices.
        None: jobs wait for a running slot only.

    A job that is not running holds no tensors: a stopped or interrupted run writes its exact
    final state to ``<job_dir>/resume-state.pt`` (:data:`RESUME_STATE_FILE`), which the next
    run loads (else the last valid checkpoint) and removes once loaded.
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        data_dir: Path,
        max_running: int = 1,
        subscriber_factory: SubscriberFactory | None = None,
        checkpoint_loader: CheckpointLoader | None = None,
        latest_checkpoint: CheckpointNamer | None = None,
        last_seq: Callable[[str], int] | None = None,
        registry: Registry | None = None,
        fit_epoch_end_timeout: float = 30.0,
        memory_limit: int | None = None,
        supervisor: WorkerSupervisor | None = None,
        run_subscriber_factory: RunSubscriberFactory | None = None,
        run_lost_seconds: float = 120.0,
        devices: DevicePool | None = None,
    ) -> None:
        if max_running < 1:
            raise ValueError(f"max_running must be at least 1, got {max_running}")
        self.bus = bus
        self.data_dir = Path(data_dir)
        self.max_running = max_running
        self.subscriber_factory = subscriber_factory
        self.checkpoint_loader = checkpoint_loader
        self.latest_checkpoint = latest_checkpoint
        self.registry = registry or default_registry()
        self.fit_epoch_end_timeout = fit_epoch_end_timeout
        self.memory_limit = memory_limit
        self.supervisor = supervisor
        self.run_subscriber_factory = run_subscriber_factory
        self.run_lost_seconds = run_lost_seconds
        self.devices = devices
        if supervisor is not None:
            supervisor.before_publish = self._move_record_before
        self._last_seq = last_seq
        self._store: JobStore | None = None
        self._handles: dict[str, JobHandle] = {}
        # Each active run's control channel, open from the moment the job is marked running
        # (before its trainer exists) until its run ends: commands sent meanwhile wait in it.
        self._controls: dict[str, ControlChannel] = {}
        # Each run in progress by its control channel: a run that ends takes out only itself,
        # not a new run of the same job resumed while the old one was finishing.
        self._active: dict[str, ControlChannel] = {}
        self._runs: dict[str, ControlChannel] = {}
        """SDK runs being followed (they train elsewhere and hold no running slot)."""
        self._publishing: dict[str, anyio.Event] = {}
        """Jobs whose state event is being published (set once it is on the bus)."""
        self._changes: dict[str, anyio.Event] = {}
        self._wakeup = anyio.Event()
        self._closing = False
        self._task_group: TaskGroup | None = None
        self._run_limiter = anyio.CapacityLimiter(max_running)
        self._idle = anyio.Event()
        self._idle.set()

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def store(self) -> JobStore:
        if self._store is None:
            raise ManagerClosed("the job manager is not running: use 'async with JobManager(...)'")
        return self._store

    async def __aenter__(self) -> JobManager:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._store = JobStore(self.data_dir / "trainbus.db")
        for job_id in self._store.all_ids():
            stored = self._last_seq(job_id) if self._last_seq else 0
            if stored > self.bus.last_seq(job_id):
                self.bus.restore_sequence(job_id, stored)
        self._task_group = anyio.create_task_group()
        await self._task_group.__aenter__()
        await self._task_group.start(self._follow_events)
        if self.supervisor is not None:
            # what a worker that outlived the previous server kept: before the checkpoint
            # names are put right, since that worker may still be saving its state
            for job_id in self._store.ids_in_states(JobState.RUNNING, JobState.PAUSED):
                kept = await self.supervisor.take_unconfirmed(job_id, self._job_dir(job_id))
                record = self._store.get(job_id)
                # the record knew the step of the last epoch's end only
                if record is not None and int(kept.get("step", 0)) > record.step:
                    self._store.update(job_id, step=int(kept["step"]))
        if self.latest_checkpoint is not None:
            await anyio.to_thread.run_sync(self._correct_checkpoint_names)
        for job_id in self._store.ids_in_states(JobState.RUNNING, JobState.PAUSED):
            await self._transition(
                job_id, JobState.INTERRUPTED, reason="the server stopped while the job was running"
            )
        self._task_group.start_soon(self._schedule)
        return self

    def _correct_checkpoint_names(self) -> None:
        """Make every record name the checkpoint that is on disk: a crash between checkpoint
        retention and the record learning the newer name leaves it naming a deleted one (for a
        job that was running, or one that had just finished). One pointer read per job."""
        assert self.latest_checkpoint is not None
        store = self.store
        for job_id in store.all_ids():
            record = store.get(job_id)
            if record is None or (
                record.checkpoint is None
                and record.state not in (JobState.RUNNING, JobState.PAUSED)
            ):
                continue
            name = self.latest_checkpoint(job_id, self._job_dir(job_id))
            if name != record.checkpoint:
                store.update(job_id, checkpoint=name)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool | None:
        with anyio.CancelScope(shield=True):
            await self.shutdown()
        assert self._task_group is not None
        self._task_group.cancel_scope.cancel()
        result = await self._task_group.__aexit__(exc_type, exc, traceback)
        self.store.close()
        self._store = None
        return result

    async def shutdown(self, timeout: float = 60.0) -> None:
        """Stop starting jobs; ask running ones to save and pause, then end them as
        ``interrupted`` (resumable); wait up to ``timeout`` seconds for their threads."""
        self._closing = True
        self._wakeup.set()
        released = set() if self.supervisor is None else self.supervisor.release_runs()
        for job_id, control in list(self._controls.items()):
            if job_id in released:
                continue  # an SDK run: its process is the user's and goes on without a pause
            with contextlib.suppress(ControlError):
                control.pause("the server is shutting down", source="shutdown")
            control.close()
        with anyio.move_on_after(timeout):
            await self._idle.wait()
        if self.supervisor is not None and not self._idle.is_set():
            self.supervisor.kill_all()  # no worker outlives the server
            with anyio.move_on_after(5):
                await self._idle.wait()

    # -- queries ----------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        """:raises JobNotFound: if no job has that id."""
        record = self.store.get(job_id)
        if record is None:
            raise JobNotFound(job_id)
        return self._with_wait(record)

    def list(
        self, state: JobState | str | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[list[JobRecord], int]:
        """Jobs in creation order, optionally of one state, and how many there are in all.

        :raises SpecError: for an unknown state or a negative offset or limit.
        """
        if offset < 0 or limit < 0:
            raise SpecError(f"offset and limit must not be negative, got {offset} and {limit}")
        try:
            wanted = None if state is None else JobState(state)
        except ValueError:
            raise SpecError(
                f"unknown job state {state!r}; states: {', '.join(s.value for s in JobState)}"
            ) from None
        records, total = self.store.list(wanted, offset, limit)
        return [self._with_wait(record) for record in records], total

    def _with_wait(self, record: JobRecord) -> JobRecord:
        """A queued job's record says what it waits for: a slot, or a server that restarts;
        a running or paused one which devices it holds."""
        if record.state in _LIVE_STATES:
            update: dict[str, Any] = {}
            if self.devices is not None:
                update["devices"] = [slot.name for slot in self.devices.held_by_job(record.id)]
            if self.supervisor is not None:
                update["rendezvous"] = self.supervisor.rendezvous_of(record.id)
            return record.model_copy(update=update)
        if record.state is not JobState.QUEUED:
            return record
        devices = None
        if self.devices is not None and len(self._active) < self.max_running:
            devices = self._device_wait(record)
        if self._closing:
            reason = "the server is shutting down; the job starts after a restart"
        elif devices is not None:
            reason = devices
        else:
            holders = ", ".join(sorted(self._active)) or "none"
            reason = (
                f"a running slot: {len(self._active)} of {self.max_running} in use ({holders}); "
                "a paused job keeps its slot until it is resumed or stopped"
            )
        return record.model_copy(update={"waiting_for": reason})

    def _device_wait(self, record: JobRecord) -> str | None:
        """The devices a queued job waits for, with a free running slot (None: an SDK run,
        which waits for its process)."""
        assert self.devices is not None
        if is_run_spec(record.spec):
            return None
        request = self.devices.request_of(record.spec)
        shortage = self.devices.shortage(request)
        if shortage is not None:
            return shortage
        return (
            f"{request.describe()}: free, but jobs queued before it wait for "
            f"{request.kind} devices and start first"
        )

    def handle(self, job_id: str) -> JobHandle | None:
        return self._handles.get(job_id)

    async def wait_for(
        self, job_id: str, states: Collection[JobState | str], timeout: float | None = None
    ) -> JobRecord:
        """Wait until the job is in one of ``states`` and return its record.

        :raises TimeoutError: after ``timeout`` seconds.
        """
        wanted = {JobState(s) for s in states}
        with anyio.fail_after(timeout):
            while True:
                record = self.get(job_id)
                if record.state in wanted:
                    return record
                event = self._changes.setdefault(job_id, anyio.Event())
                await event.wait()

    def _changed(self, job_id: str) -> None:
        event = self._changes.pop(job_id, None)
        if event is not None:
            event.set()

    # -- requests ---------------------------------------------------------------------------

    async def submit(
        self,
        spec: JobSpec | ProgramSpec | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> JobRecord:
        """Create a job from ``spec`` and queue it; with ``idempotency_key``, a second submit
        with the same key returns the job the first one created (see :meth:`submit_once`).

        :raises pydantic.ValidationError: if the spec is invalid (field by field).
        :raises ManagerClosed: while shutting down.
        """
        return (await self.submit_once(spec, idempotency_key=idempotency_key))[0]

    async def submit_once(
        self,
        spec: JobSpec | ProgramSpec | Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
    ) -> tuple[JobRecord, bool]:
        """:meth:`submit`, and whether it created the job (False: the key's job came back).

        :raises KeyConflict: if the key was used for a job of another spec.
        """
        if self._closing:
            raise ManagerClosed("the server is shutting down and accepts no new jobs")
        spec = parse_job_spec(spec)
        if isinstance(spec, ProgramSpec):
            if self.supervisor is None or self.supervisor.processes is None:
                raise SpecError(
                    "a registered program runs in a worker process, and this server runs "
                    "jobs on threads (setting run_jobs_in: use 'process')"
                )
        else:
            check_runtime(spec)  # e.g. a CUDA device on a server without one: refused (422)
            if spec.distributed is not None and (
                self.supervisor is None or self.supervisor.processes is None
            ):
                raise SpecError(
                    "a distributed job runs its ranks in worker processes, and this server "
                    "runs jobs on threads (setting run_jobs_in: use 'process')"
                )
            if self.memory_limit is not None:
                await self._check_memory(spec, self.memory_limit)
        if self.devices is not None:  # more devices than the server has: refused now (422)
            self.devices.check(self.devices.request_of(spec.model_dump(mode="json")))
        job_id = uuid.uuid4().hex[:12]
        record = JobRecord(
            id=job_id,
            name=spec.name,
            state=JobState.QUEUED,
            spec=spec.model_dump(mode="json"),
            created_at=time.time(),
        )
        key = None if idempotency_key is None else f"idempotency:{idempotency_key}"
        holder = self.store.insert(record, key=key)
        if holder != job_id:
            earlier = self.get(holder)
            if earlier.spec != record.spec:
                raise KeyConflict(
                    "this Idempotency-Key was used for a job with another spec "
                    f"(job {holder}): use a new key for a new job"
                )
            return earlier, False
        await self.bus.publish_async(
            job_id, EventType.JOB_QUEUED, {"name": spec.name, "spec": record.spec}
        )
        self._wakeup.set()
        return record, True

    async def attach_run(self, spec: RunSpec) -> tuple[JobRecord, str, bool]:
        """Create the job of SDK run ``spec.run_id``, or attach to it again (a process of the
        run restarted, possibly from a checkpoint at ``spec.from_step``): the job's record,
        the credential of the process that attaches, and whether the job was created.

        :raises IllegalTransition: if the run's job has completed (a new run needs a new id).
        :raises ManagerClosed: while shutting down, or without a supervisor for runs.
        """
        if self._closing:
            raise ManagerClosed("the server is shutting down and accepts no new runs")
        supervisor = self.supervisor
        if supervisor is None:
            raise ManagerClosed("this job manager follows no SDK runs (it has no supervisor)")
        stored = spec.model_dump(mode="json", exclude={"from_step"})
        record = JobRecord(
            id=uuid.uuid4().hex[:12],
            name=spec.name or spec.run_id,
            state=JobState.QUEUED,
            spec=stored,
            created_at=time.time(),
        )
        job_id = self.store.insert(record, key=f"run:{spec.run_id}")
        created = job_id == record.id
        if created:
            await self.bus.publish_async(
                job_id, EventType.JOB_QUEUED, {"name": record.name, "spec": stored}
            )
        else:
            self.store.update(job_id, spec=stored, name=record.name)
        record = self.get(job_id)
        if record.state is JobState.COMPLETED:
            raise IllegalTransition(
                job_id, record.state, f"attach run {spec.run_id!r} to", ["not completed"]
            )
        if record.state in _LIVE_STATES and job_id in self._controls:
            return record, supervisor.attach(job_id, self._controls[job_id]), created
        if record.state in ENDED_STATES:
            self.store.update(job_id, stop_reason=None, ended_at=None, error=None)
            await self._transition(job_id, JobState.QUEUED, resumed=True)
        resumed = record.started_at is not None
        control = ControlChannel(job_id, publish=self._publish_command_applied)
        self._runs[job_id] = control  # it trains in the user's process: it takes no slot
        self._controls[job_id] = control
        self._idle = anyio.Event()
        token = supervisor.attach(job_id, control)
        from_step = {} if spec.from_step is None else {"from_step": spec.from_step}
        await self._transition(job_id, JobState.RUNNING, resumed=resumed, **from_step)
        assert self._task_group is not None
        self._task_group.start_soon(
            self._follow_run, supervisor, job_id, spec, control, name=f"run {job_id}"
        )
        return self.get(job_id), token, created

    async def _follow_run(
        self,
        supervisor: WorkerSupervisor,
        job_id: str,
        spec: RunSpec,
        control: ControlChannel,
    ) -> None:
        attached: list[SubscriberHandle] = []
        progress: dict[str, Any] = {}
        try:
            if self.run_subscriber_factory is not None:
                for subscriber in self.run_subscriber_factory(job_id, spec, control):
                    attached.append(self.bus.attach(subscriber))
            result, progress = await supervisor.follow(
                job_id,
                lost_after=self.run_lost_seconds,
                stall_timeout=spec.stall_timeout_seconds,
                on_stall=spec.on_stall,
            )
        except Exception as error:
            logger.exception("run %s could not be followed", job_id)
            result = RunResult(
                Outcome.FAILED, error={"type": type(error).__name__, "message": str(error)}
            )
        finally:
            control.close()
            self._controls.pop(job_id, None)
            with anyio.CancelScope(shield=True):
                for subscriber_handle in attached:
                    await subscriber_handle.detach()
        await self._finish(job_id, control, progress or None, result)

    async def _check_memory(self, spec: JobSpec, limit: int) -> None:
        """:raises SpecError: if the job is estimated to take more than ``limit`` bytes."""
        estimate = await anyio.to_thread.run_sync(
            estimate_memory, spec, self.registry, self.data_dir
        )
        if estimate.total > limit:
            raise SpecError(
                f"the job would take about {format_bytes(estimate.total)} of memory "
                f"({estimate.describe()}), more than the {format_bytes(limit)} a job may take "
                "(setting max_job_memory_bytes): use a smaller model, dataset or batch_size"
            )

    def pause(self, job_id: str, *, reason: str = "", source: str = "api") -> Command:
        """Ask a running job to hold at its next batch boundary.

        :raises IllegalTransition: unless the job is running.
        """
        record = self.get(job_id)
        if record.state is not JobState.RUNNING:
            raise IllegalTransition(job_id, record.state, "pause", ["running"])
        return self._send(job_id, record.state, "pause", lambda c: c.pause(reason, source=source))

    def save(self, job_id: str, *, reason: str = "", source: str = "api") -> Command:
        """Ask a running or paused job for a checkpoint at its next batch boundary.

        :raises IllegalTransition: unless the job is running or paused.
        """
        record = self.get(job_id)
        if record.state not in (JobState.RUNNING, JobState.PAUSED):
            raise IllegalTransition(job_id, record.state, "save", ["running", "paused"])
        return self._send(job_id, record.state, "save", lambda c: c.save(reason, source=source))

    def set_lr(
        self, job_id: str, value: float, *, reason: str = "", source: str = "api"
    ) -> Command:
        """Ask a running or paused job to set its learning rate to ``value`` at its next batch
        boundary (a schedule continues relative to the new value).

        :raises IllegalTransition: unless the job is running or paused.
        """
        record = self.get(job_id)
        if record.state not in (JobState.RUNNING, JobState.PAUSED):
            raise IllegalTransition(job_id, record.state, "set_lr", ["running", "paused"])
        return self._send(
            job_id, record.state, "set_lr", lambda c: c.set_lr(value, reason, source=source)
        )

    def stop(self, job_id: str, *, reason: str = "", source: str = "api") -> Command:
        """Stop a running or paused job after its current batch (it is checkpointed and can be
        resumed); a queued job stops at once.

        :raises IllegalTransition: if the job has already ended.
        """
        record = self.get(job_id)
        if record.state in (JobState.RUNNING, JobState.PAUSED):
            command = self._send(
                job_id, record.state, "stop", lambda c: c.stop(reason, source=source)
            )
            if self.supervisor is not None:
                self.supervisor.request_stop(job_id)
            return command
        if record.state is JobState.QUEUED:
            command = _command(CommandKind.STOP, source, reason)
            self._handles.pop(job_id, None)
            self.store.update(
                job_id,
                state=JobState.STOPPED,
                stop_reason=reason or "stopped while queued",
                ended_at=time.time(),
            )
            self.bus.publish(
                job_id, EventType.JOB_STOPPED, {**command.to_dict(), "step": record.step}
            )
            self._changed(job_id)
            return command
        raise IllegalTransition(job_id, record.state, "stop", ["queued", "running", "paused"])

    async def resume(self, job_id: str, *, reason: str = "", source: str = "api") -> Command:
        """Resume a paused job, or queue a stopped, interrupted or failed one to continue from
        where it ended (the state its run kept, else its last valid checkpoint: for a failed
        job, the last good state), e.g. once the cause of a failure is fixed.

        :raises IllegalTransition: for queued, running or completed jobs.
        :raises ManagerClosed: while shutting down.
        """
        record = self.get(job_id)
        if record.state is JobState.PAUSED:
            return self._send(
                job_id, record.state, "resume", lambda c: c.resume(reason, source=source)
            )
        if record.state in (JobState.STOPPED, JobState.INTERRUPTED, JobState.FAILED):
            if is_run_spec(record.spec):
                raise IllegalTransition(
                    job_id,
                    f"{record.state.value} (an SDK run: it resumes when a process of it "
                    f"attaches again with run id {record.spec['run_id']!r})",
                    "resume",
                    ["paused"],
                )
            if self._closing:
                raise ManagerClosed("the server is shutting down and starts no jobs")
            command = _command(CommandKind.RESUME, source, reason)
            self.store.update(job_id, stop_reason=None, ended_at=None, error=None)
            await self._transition(job_id, JobState.QUEUED, resumed=True, **command.to_dict())
            self._wakeup.set()
            return command
        raise IllegalTransition(
            job_id, record.state, "resume", ["paused", "stopped", "interrupted", "failed"]
        )

    async def delete(self, job_id: str) -> int:
        """Remove an ended job's record and its folder (events are the store's business);
        returns the ``seq`` of the job's last event, which an event store must hold before it
        deletes the job's events (else it writes a straggler back after the delete).

        :raises IllegalTransition: unless the job has ended.
        """
        while (publishing := self._publishing.get(job_id)) is not None:
            await publishing.wait()  # the record has ended; its event is not on the bus yet
        record = self.get(job_id)
        if record.state not in ENDED_STATES or job_id in self._active or job_id in self._runs:
            raise IllegalTransition(
                job_id, record.state, "delete", sorted(s.value for s in ENDED_STATES)
            )
        self.store.delete(job_id)
        self._handles.pop(job_id, None)
        job_dir = self._job_dir(job_id)
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(job_dir, ignore_errors=True))
        last_seq = self.bus.last_seq(job_id)
        self.bus.forget(job_id)
        self._changed(job_id)
        return last_seq

    def _send(
        self, job_id: str, state: JobState, action: str, send: Callable[[ControlChannel], Command]
    ) -> Command:
        control = self._controls.get(job_id)
        try:
            if control is None:
                raise ControlError("the run has ended")
            return send(control)
        except ControlError:
            # the record still says running or paused while the ended run's outcome is stored
            raise IllegalTransition(job_id, "ending", action, ["running", "paused"]) from None

    # -- running ----------------------------------------------------------------------------

    def _job_dir(self, job_id: str) -> Path:
        return self.data_dir / "jobs" / job_id

    async def _transition(self, job_id: str, state: JobState, **data: Any) -> None:
        """Move a job to ``state`` (legal moves only), persist it, publish its event."""
        record = self.get(job_id)
        if state not in TRANSITIONS[record.state]:
            raise IllegalTransition(
                job_id, record.state, f"move to {state.value}",
                sorted(s.value for s, targets in TRANSITIONS.items() if state in targets),
            )  # fmt: skip
        fields: dict[str, Any] = {"state": state}
        if state is JobState.RUNNING:
            fields["started_at"] = time.time()
        if state in ENDED_STATES:
            fields["ended_at"] = time.time()
        published = self._publishing[job_id] = anyio.Event()
        try:
            self.store.update(job_id, **fields)
            await self.bus.publish_async(
                job_id, state.event_type, {"epoch": record.epoch, "step": record.step, **data}
            )
        finally:
            if self._publishing.get(job_id) is published:
                del self._publishing[job_id]
            published.set()
        self._changed(job_id)

    async def _schedule(self) -> None:
        while not self._closing:
            while not self._closing and len(self._active) < self.max_running:
                queued = [
                    job_id
                    for job_id in self.store.queued_in_order()
                    if not is_run_spec(self.get(job_id).spec)  # an SDK run starts on attach
                ]
                picked = self._next_to_start(queued)
                if picked is None:
                    break
                job_id, slots = picked
                resumed = self.get(job_id).started_at is not None  # it ran before
                control = ControlChannel(job_id, publish=self._publish_command_applied)
                self._active[job_id] = control
                self._idle = anyio.Event()
                self._controls[job_id] = control
                placed: dict[str, Any] = {}
                if self.devices is not None:
                    self.devices.hold(control, job_id, slots)
                    placed["devices"] = [slot.name for slot in slots]
                await self._transition(job_id, JobState.RUNNING, resumed=resumed, **placed)
                assert self._task_group is not None
                self._task_group.start_soon(
                    self._run, job_id, resumed, control, name=f"job {job_id}"
                )
            await self._wakeup.wait()
            self._wakeup = anyio.Event()

    def _next_to_start(self, queued: Sequence[str]) -> tuple[str, tuple[DeviceSlot, ...]] | None:
        """The first queued job whose devices are free, and those devices; a job never
        starts ahead of an earlier one that waits for devices of its kind (None: none can
        start now)."""
        if self.devices is None:
            return (queued[0], ()) if queued else None
        waiting: set[str] = set()
        for job_id in queued:
            request = self.devices.request_of(self.get(job_id).spec)
            if request.kind in waiting:
                continue
            slots = self.devices.available(request)
            if slots is not None:
                return job_id, slots
            waiting.add(request.kind)
        return None

    def _publish_command_applied(
        self, job_id: str, event_type: EventType, data: Mapping[str, Any]
    ) -> Event:
        """Publish what a trainer did with a command (on its thread); a pause or resume moves
        the record first, so that whoever sees ``job_paused`` finds the job paused."""
        self._move_record_before(job_id, event_type)
        return self.bus.publish(job_id, event_type, data)

    def _move_record_before(self, job_id: str, event_type: EventType) -> None:
        moves = _COMMAND_MOVES.get(event_type)
        if moves is not None:
            record = self.store.get(job_id)
            if record is not None and record.state is moves[0]:
                self.store.update(job_id, state=moves[1])

    async def _run(self, job_id: str, resumed: bool, control: ControlChannel) -> None:
        if self.supervisor is not None and self.supervisor.processes is not None:
            await self._run_in_process(self.supervisor, job_id, resumed, control)
        else:
            await self._run_on_thread(job_id, resumed, control)

    async def _run_in_process(
        self, supervisor: WorkerSupervisor, job_id: str, resumed: bool, control: ControlChannel
    ) -> None:
        progress: dict[str, Any] = {}
        attached: list[SubscriberHandle] = []
        try:
            record = self.get(job_id)
            spec = parse_job_spec(record.spec)  # a plugin may have been removed
            if isinstance(spec, ProgramSpec) and self.run_subscriber_factory is not None:
                # the program is the operator's code: its controllers decide on the server
                for subscriber in self.run_subscriber_factory(job_id, spec, control):
                    attached.append(self.bus.attach(subscriber))
            worker_spec, environment = record.spec, {}
            if self.devices is not None:  # it sees only its devices, with its share of cores
                slots = self.devices.held(control)
                worker_spec = self.devices.worker_spec(record.spec, slots)
                environment = self.devices.environment(slots)
            result, progress = await supervisor.run(
                job_id,
                worker_spec,
                resumed=resumed,
                control=control,
                job_dir=self._job_dir(job_id),
                environment=environment,
                stall_timeout=spec.stall_timeout_seconds,
                on_stall=spec.on_stall,
            )
        except Exception as error:
            logger.exception("job %s could not run", job_id)
            result = RunResult(
                Outcome.FAILED, error={"type": type(error).__name__, "message": str(error)}
            )
        finally:
            control.close()
            self._controls.pop(job_id, None)
            with anyio.CancelScope(shield=True):
                for subscriber_handle in attached:
                    await subscriber_handle.detach()
        if progress.pop("restarted", False):
            self.store.update(job_id, epoch=0, step=0, metrics={})
        await self._finish(job_id, control, progress or None, result)

    async def _run_on_thread(self, job_id: str, resumed: bool, control: ControlChannel) -> None:
        handle: JobHandle | None = None
        attached: list[SubscriberHandle] = []
        started = False  # the trainer holds the job's progress (its state restored, or new)
        result: RunResult
        try:
            # Inside the try: a stored spec that no longer validates (a plugin was removed)
            # fails this job, not the manager.
            if is_program_spec(self.get(job_id).spec):
                raise SpecError("a registered program runs in a worker process only")
            spec = JobSpec.model_validate(self.get(job_id).spec)
            handle = JobHandle(job_id, spec, self._job_dir(job_id), control)
            self._handles[job_id] = handle
            # the handle is the one holder of the trainer: dropping it there frees the model
            handle.trainer = await anyio.to_thread.run_sync(self._build_trainer, handle)
            for subscriber in self.subscriber_factory(handle) if self.subscriber_factory else ():
                attached.append(self.bus.attach(subscriber))
            if resumed:
                await self._restore(handle)
            started = True
            result = await anyio.to_thread.run_sync(
                run_and_keep_state, handle, limiter=self._run_limiter
            )
        except Exception as error:
            logger.exception("job %s could not run", job_id)
            result = RunResult(
                Outcome.FAILED, error={"type": type(error).__name__, "message": str(error)}
            )
        finally:
            control.close()
            self._controls.pop(job_id, None)
            with anyio.CancelScope(shield=True):
                for subscriber_handle in attached:
                    await subscriber_handle.detach()
        trainer = handle.trainer if handle is not None and started else None
        progress = None
        if trainer is not None:
            progress = {
                "epoch": trainer.epoch + int(trainer.epoch_complete),
                "step": trainer.step,
                "metrics": trainer.metrics,
            }
        del trainer
        if handle is not None:
            handle.trainer = None  # free the model and the data; the progress is kept above
            await anyio.to_thread.run_sync(release_memory)
        await self._finish(job_id, control, progress, result)

    def _build_trainer(self, handle: JobHandle) -> Trainer:
        handle.job_dir.mkdir(parents=True, exist_ok=True)
        return Trainer(
            job_id=handle.id,
            spec=handle.spec,
            bus=self.bus,
            control=handle.control,
            data_dir=self.data_dir,
            registry=self.registry,
            fit_epoch_end_timeout=self.fit_epoch_end_timeout,
            shares_process=True,  # jobs run as threads of this process
        )

    async def _restore(self, handle: JobHandle) -> None:
        """Load the previous run's state into the new trainer (``restore_state``); with none,
        the job starts over (and says so in the log and its record)."""
        restored = await anyio.to_thread.run_sync(restore_state, handle, self.checkpoint_loader)
        if not restored:
            logger.warning("job %s has no saved state to resume from: it starts over", handle.id)
            self.store.update(handle.id, epoch=0, step=0, metrics={})

    async def _finish(
        self,
        job_id: str,
        control: ControlChannel,
        progress: Mapping[str, Any] | None,
        result: RunResult,
    ) -> None:
        """Store how the run ended; ``progress`` (``epoch``, ``step``, ``metrics``) is None
        when the run never started (its state did not load): the record keeps the progress of
        the run before."""
        state = _OUTCOME_STATES[result.outcome]
        fields: dict[str, Any] = {"stop_reason": result.stop_reason}
        data: dict[str, Any] = {"reason": result.stop_reason, **result.details}
        if result.error is not None:
            fields["error"] = JobFailure.model_validate(result.error).model_dump()
            data["error"] = result.error
        if progress is not None:
            fields.update(progress)
            if "metrics" in progress:
                data["metrics"] = progress["metrics"]
        self.store.update(job_id, **fields)
        await self._transition(job_id, state, **data)
        if self._active.get(job_id) is control:
            del self._active[job_id]
        if self.devices is not None:
            self.devices.release(control)
        if self._runs.get(job_id) is control:
            del self._runs[job_id]
        if not self._active and not self._runs:
            self._idle.set()
        self._wakeup.set()

    async def _follow_events(self, *, task_status: anyio.abc.TaskStatus[None]) -> None:
        """Keep records in step with what trainers publish (pauses, epochs, checkpoints)."""
        subscription = self.bus.subscribe(
            "job_manager",
            types=[
                EventType.JOB_PAUSED,
                EventType.JOB_RESUMED,
                EventType.FIT_EPOCH_END,
                EventType.CHECKPOINT_SAVED,
            ],
            buffer_size=65_536,
        )
        task_status.started()
        async with subscription:
            async for event in subscription:
                record = self.store.get(event.job_id)
                if record is None:
                    continue
                data = event.data
                if event.type in _COMMAND_MOVES:
                    pass  # the record moved as the trainer published it; wake wait_for()
                elif event.type is EventType.FIT_EPOCH_END and record.state in _LIVE_STATES:
                    self.store.update(
                        event.job_id,
                        epoch=int(data.get("epoch", 0)) + 1,
                        step=int(data.get("step", 0)),
                        metrics={k: float(v) for k, v in data.get("metrics", {}).items()},
                    )
                elif event.type is EventType.CHECKPOINT_SAVED and "name" in data:
                    self.store.update(event.job_id, checkpoint=str(data["name"]))
                else:
                    continue
                self._changed(event.job_id)


def _command(kind: CommandKind, source: str, reason: str) -> Command:
    return Command(uuid.uuid4().hex[:16], kind, source, reason, None, time.time())
