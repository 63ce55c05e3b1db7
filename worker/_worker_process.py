"""A job's worker process: its own bus, trainer and trainer-side subscribers, and a bridge to
the server (``docs/PROTOCOL.md``).

The server starts it from a fork server that has torch and trainbus imported already
(``worker/_processes.py``); :func:`worker_main` is the process's entry point.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import faulthandler
import logging
import os
import re
import resource
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import (
    SHUTDOWN_SOURCE,
    ControlChannel,
    ControlError,
    Event,
    EventBus,
    EventType,
    Subscriber,
    SubscriberHandle,
)
from trainbus.sdk import ServerBridge

from ._manager import JobHandle
from ._runs import CheckpointLoader, restore_state, run_and_keep_state
from ._spec import JobSpec
from ._trainer import Outcome, RunResult, Trainer
from ._unconfirmed import hold_worker_lock, write_unconfirmed

__all__ = ["EXIT_INTERRUPTED", "WorkerFactory", "WorkerSetup", "worker_main"]

logger = logging.getLogger(__name__)

WorkerFactory = Callable[[JobHandle, EventBus], Sequence[Subscriber]]
"""The trainer-side subscribers of a run (checkpoint writer, controllers, trackers): a
module-level function, or a partial of one, so that it reaches the process by reference."""

_PR_SET_PDEATHSIG = 1

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL
"""The worker's exit code when the server went away and the run ended interrupted, its state
kept to resume from (the result could not be delivered)."""
EXIT_UNDELIVERED = 2
"""The run ended but the server did not take its result."""
EXIT_REFUSED = 3
"""The server refused the worker (credential, protocol version) or never answered."""

SERVER_GONE_GRACE = 1.5
"""Seconds a worker whose server is gone gives its run to end at a batch boundary with its
state saved; then it ends regardless (a step or a checkpoint that long loses what it did)."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker process is started with (it crosses the process boundary)."""

    job_id: str
    spec: dict[str, Any]
    job_dir: Path
    data_dir: Path
    url: str
    """The server's worker endpoint for this job."""
    token: str = field(repr=False)
    """The job's credential: it can publish this job's events and receive its commands."""
    resumed: bool = False
    fit_epoch_end_timeout: float = 30.0
    environment: Mapping[str, str] = field(default_factory=dict)
    """Set before the job starts (its devices: ``CUDA_VISIBLE_DEVICES``)."""
    subscriber_factory: WorkerFactory | None = None
    checkpoint_loader: CheckpointLoader | None = None
    rendezvous: str = "localhost:0"
    """Where a distributed job's ranks meet (``host:port``; port 0: a free one)."""
    memory_limit_bytes: int | None = None
    """The process's address-space limit (``RLIMIT_AS``); past it allocations fail."""
    server_pid: int = field(default_factory=os.getpid)
    """The server's process (the setup is made there): the worker ends when it is gone."""
    log_name: str = "worker.log"
    stack_name: str = "worker-stack.txt"

    @property
    def log_path(self) -> Path:
        """The worker's stderr (its log lines, and a traceback if it crashes)."""
        return self.job_dir / self.log_name

    @property
    def stack_path(self) -> Path:
        """Where the worker writes every thread's stack on ``SIGUSR1`` (a stalled job)."""
        return self.job_dir / self.stack_name


def worker_main(setup: WorkerSetup) -> None:
    """The process's entry point: run the job, then exit (0 once the server has the result)."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the fork server ignores it, not a worker
    setup.job_dir.mkdir(parents=True, exist_ok=True)
    log = open(setup.log_path, "ab", buffering=0)  # noqa: SIM115 - open for the process's life
    os.dup2(log.fileno(), 2)
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    faulthandler.enable(file=sys.stderr, all_threads=True)  # a segfault leaves its stack here
    stack = open(setup.stack_path, "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stack, all_threads=True, chain=False)
    _die_with_parent()
    os.environ.update(setup.environment)
    if setup.memory_limit_bytes is not None:
        resource.setrlimit(resource.RLIMIT_AS, (setup.memory_limit_bytes,) * 2)
    if setup.spec.get("distributed"):  # the elastic agent of the job's ranks
        from ._distributed import run_agent

        code = run_agent(setup)
    elif "program" in setup.spec:  # a registered program: the operator's code, with its run
        from ._program_process import run_program

        code = run_program(setup)
    else:
        code = anyio.run(_run, setup)
    sys.stderr.flush()
    os._exit(code)  # no interpreter teardown: the result is with the server already


def _die_with_parent() -> None:
    """Get SIGTERM (a graceful interrupt) if the fork server, and so the server, dies."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


async def _run(
    setup: WorkerSetup,
    trainer_type: Callable[..., Trainer] = Trainer,
    *,
    save_when_server_gone: bool = True,
) -> int:
    """Run the job with a bridge to the server. When the server's process is gone the run
    ends at its next batch boundary with its state saved and its unconfirmed events kept for
    the next server (``worker/_unconfirmed.py``); with ``save_when_server_gone`` False the
    process ends at once (a distributed job's rank 0: its elastic agent ends the others)."""
    job_id = setup.job_id
    paused = [False]
    # held until the process ends: the next server reads what it keeps only after that
    if save_when_server_gone and hold_worker_lock(setup.job_dir) is None:
        logger.warning("job %s: a worker of an earlier run still holds its lock", job_id)
    async with EventBus() as bus:

        def publish_applied(job: str, event_type: EventType, data: Mapping[str, Any]) -> Event:
            if event_type is EventType.JOB_PAUSED:
                paused[0] = True
            elif event_type is EventType.JOB_RESUMED:
                paused[0] = False
            return bus.publish(job, event_type, data)

        control = ControlChannel(job_id, publish=publish_applied)
        handle = JobHandle(job_id, JobSpec.model_validate(setup.spec), setup.job_dir, control)
        trainer_box: list[Trainer] = []

        def progress() -> dict[str, Any]:
            trainer = trainer_box[0] if trainer_box else None
            if trainer is None:
                return {"step": 0, "epoch": 0, "paused": paused[0]}
            return {"step": trainer.step, "epoch": trainer.epoch, "paused": paused[0]}

        bridge = ServerBridge(
            job_id=job_id, url=setup.url, token=setup.token, control=control, progress=progress
        )
        bridge.on_server_gone.append(lambda: _interrupt(control, "the server is gone"))
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with anyio.create_task_group() as group:
                await group.start(bridge.run)
                group.start_soon(_on_signals, signals, control)
                group.start_soon(
                    _end_with_server,
                    setup.server_pid,
                    bridge if save_when_server_gone else None,
                    setup.job_dir,
                )
                bridge_handle = bus.attach(bridge)
                result, final = await _train(setup, bus, handle, trainer_box, trainer_type)
                await bridge_handle.detach()  # every event handed to the bridge
                delivered = await bridge.finish(
                    {**final, **_result_fields(result)}, last=bus.last_seq(job_id)
                )
                group.cancel_scope.cancel()
    if bridge.refused is not None:
        print(f"trainbus worker: {bridge.refused}", file=sys.stderr)
        return EXIT_REFUSED
    if bridge.server_gone.is_set() and save_when_server_gone:
        write_unconfirmed(setup.job_dir, bridge.unconfirmed(final))
        return EXIT_INTERRUPTED
    if not delivered and result.outcome is Outcome.INTERRUPTED:
        return EXIT_INTERRUPTED
    return 0 if delivered else EXIT_UNDELIVERED


async def _end_with_server(pid: int, bridge: ServerBridge | None, job_dir: Path) -> None:
    """When the server's process is gone (killed, crashed): with a ``bridge``, end the run at
    its next batch boundary with its state saved, within :data:`SERVER_GONE_GRACE`; without,
    or past that, exit at once. No worker outlives its server for long, and none trains on
    past the state the restarted server will find. A server that shuts down in order ends
    its workers itself first."""
    try:
        watch = os.pidfd_open(pid)
    except (AttributeError, OSError):
        watch = None  # no pidfd (not Linux, or an old kernel): look twice a second
    try:
        if watch is not None:
            await anyio.wait_readable(watch)
        else:
            while _alive(pid):  # noqa: ASYNC110 - polling another process; no event to wait on
                await anyio.sleep(0.5)
    finally:
        if watch is not None:
            os.close(watch)
    if bridge is not None:
        print(
            f"trainbus worker: the server (pid {pid}) is gone; the worker ends the run at its "
            "next batch, its state and unconfirmed events kept",
            file=sys.stderr,
        )
        sys.stderr.flush()
        bridge.lose_server()  # interrupts the run (its on_server_gone)
        await anyio.sleep(SERVER_GONE_GRACE)  # cancelled when the run ends in time
        write_unconfirmed(job_dir, bridge.unconfirmed())
        print(f"trainbus worker: the run did not end within {SERVER_GONE_GRACE} s", file=sys.stderr)
    else:
        print(f"trainbus worker: the server (pid {pid}) is gone; the worker ends", file=sys.stderr)
    sys.stderr.flush()
    os._exit(EXIT_INTERRUPTED)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def _train(
    setup: WorkerSetup,
    bus: EventBus,
    handle: JobHandle,
    trainer_box: list[Trainer],
    trainer_type: Callable[..., Trainer] = Trainer,
) -> tuple[RunResult, dict[str, Any]]:
    """Build, restore and run the trainer with its subscribers; the result and the progress
    the job ended with (``epoch``, ``step``, ``metrics``; empty if it never started)."""
    attached: list[SubscriberHandle] = []
    final: dict[str, Any] = {}
    started = False  # the trainer holds the job's progress (its state restored, or new)
    try:
        spec = handle.spec
        handle.trainer = await anyio.to_thread.run_sync(
            lambda: trainer_type(
                job_id=handle.id,
                spec=spec,
                bus=bus,
                control=handle.control,
                data_dir=setup.data_dir,
                fit_epoch_end_timeout=setup.fit_epoch_end_timeout,
            )
        )
        trainer_box.append(handle.trainer)
        for subscriber in setup.subscriber_factory(handle, bus) if setup.subscriber_factory else ():
            attached.append(bus.attach(subscriber))
        if setup.resumed:
            restored = await anyio.to_thread.run_sync(
                restore_state, handle, setup.checkpoint_loader
            )
            if not restored:
                logger.warning(
                    "job %s has no saved state to resume from: it starts over", handle.id
                )
                final["restarted"] = True
        started = True
        result = await anyio.to_thread.run_sync(run_and_keep_state, handle)
    except Exception as error:
        logger.exception("job %s could not run", handle.id)
        result = RunResult(
            Outcome.FAILED, error={"type": type(error).__name__, "message": str(error)}
        )
    finally:
        handle.control.close()
        with anyio.CancelScope(shield=True):
            for subscriber_handle in attached:
                await subscriber_handle.detach()
    if setup.memory_limit_bytes is not None:
        result = _name_memory_limit(result, setup.memory_limit_bytes)
    trainer = handle.trainer
    if trainer is not None and started:
        final.update(
            epoch=trainer.epoch + int(trainer.epoch_complete),
            step=trainer.step,
            metrics=dict(trainer.metrics),
        )
    handle.trainer = None  # the process ends next: nothing to give back to the system
    trainer_box.clear()
    del trainer
    return result, final


_OUT_OF_MEMORY = ("Cannot allocate memory", "can't allocate memory", "std::bad_alloc")
_TORCH_CHECK = re.compile(r"^\[enforce fail at [^\]]*\][^.]*\.\s*")


def _name_memory_limit(result: RunResult, limit: int) -> RunResult:
    """A run that failed for want of memory under the worker's limit says so, and names the
    limit; the allocator's own words follow."""
    error = result.error
    if result.outcome is not Outcome.FAILED or error is None:
        return result
    kind, message = str(error.get("type")), str(error.get("message"))
    if kind != "MemoryError" and not any(words in message for words in _OUT_OF_MEMORY):
        return result
    detail = message.strip().splitlines()[0] if message.strip() else kind
    detail = _TORCH_CHECK.sub("", detail)  # where in torch's C++ the check is, not the why
    error = {
        **error,
        "type": "MemoryLimitExceeded",
        "message": f"the job exceeded its memory limit of {limit / 2**20:.0f} MiB ({detail})",
        "memory_limit_bytes": limit,
    }
    return dataclasses.replace(result, error=error)


def _result_fields(result: RunResult) -> dict[str, Any]:
    return {
        "outcome": result.outcome.value,
        "stop_reason": result.stop_reason,
        "error": result.error,
        "details": result.details,
    }


def _interrupt(control: ControlChannel, reason: str) -> None:
    """End the run at its next batch boundary as interrupted, its state kept to resume from."""
    with contextlib.suppress(ControlError):
        control.pause(reason, source=SHUTDOWN_SOURCE)
    control.close()


async def _on_signals(signals: Any, control: ControlChannel) -> None:
    async for signum in signals:
        logger.warning(
            "worker got %s: ending the run at the next batch", signal.Signals(signum).name
        )
        _interrupt(control, f"the worker got {signal.Signals(signum).name}")
