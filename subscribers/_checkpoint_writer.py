"""The checkpoint writer: CPU snapshots on the training thread, durable writes on another."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import DeliveryPolicy, EventBus, EventType, Mode, Subscriber, improves

from ._checkpoint_files import (
    apply_retention,
    clean_orphans,
    last_serial,
    write_checkpoint,
    write_pointer,
)
from ._checkpoint_layout import CheckpointInfo, list_checkpoints, read_pointer
from ._snapshot import snapshot
from ._trainer import TrainerLike

__all__ = ["CheckpointWriter", "CheckpointWriterStatistics"]

logger = logging.getLogger(__name__)

# Requests for these reasons are never dropped: they are the states a user resumes from.
_ESSENTIAL_REASONS = frozenset({"command", "pause", "stop", "failure", "end", "shutdown"})


@dataclass(slots=True)
class _Request:
    state: Any
    epoch: int
    step: int
    reason: str
    metrics: dict[str, float]
    essential: bool
    best: bool
    snapshot_seconds: float
    weights: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class CheckpointWriterStatistics:
    """A snapshot of a writer's counters.

    ``replaced``: routine requests superseded by a newer one before being written;
    ``waited_seconds``: time the training thread waited for the pending slot (only when an
    essential request was pending).
    """

    requested: int
    written: int
    replaced: int
    failed: int
    pending: bool
    writing: bool
    waited_seconds: float
    last_checkpoint: str | None


class CheckpointWriter(Subscriber):
    """Writes a job's checkpoints: the training thread waits only for a CPU snapshot.

    Bind it to the trainer (:meth:`bind`) and attach it to the bus (the job manager does
    both). At each ``on_model_save`` callback the writer reads ``trainer.save_reason``
    (``epoch_end|command|pause|stop|failure|end``) and saves when:

    - ``epoch_end``: every ``every_n_epochs`` epochs, or when ``monitor`` improved (a
      ``best`` checkpoint, with ``keep_best`` > 0);
    - ``command``: always; ``pause`` / ``stop`` / ``failure``: per ``save_on_*``; ``end``:
      always, so a finished job can be resumed or inspected; ``shutdown`` (the pause of a
      server shutdown): always, so the job resumes after the restart;
    - every ``every_n_steps`` optimizer steps (an ``on_train_batch_end`` callback).

    Queueing (at most one write in flight, at most one request waiting): a new request
    takes the waiting slot. A *routine* waiting request (periodic, not a new best) is
    replaced by the newer one: its state is older and the newer one supersedes it (counted
    in ``replaced``). An *essential* waiting request (save command, pause, stop, failure,
    end, or a new best) is never dropped: the training thread waits until the writer
    takes it, then queues its own. So training waits for the disk only when it asks for
    essential checkpoints faster than they can be written, and memory holds at most three
    snapshots. :meth:`flush` waits until everything requested is durable.

    Snapshots reuse the memory of snapshots already written, so a snapshot is a copy into
    existing tensors: the writer keeps up to two copies of the trainer state in memory.

    After each write: the ``latest`` pointer moves (and ``best`` when the monitored value
    is the best so far), checkpoints outside the retention (``keep_last`` newest plus
    ``keep_best`` best) are deleted, and a ``checkpoint_saved`` event is published with
    ``name``, ``epoch``, ``step``, ``metric`` (the monitored value), ``bytes``, ``seconds``
    (snapshot + write), ``reason`` and ``best``. Orphaned temporary folders of the job are
    removed when the writer is created.

    A write that fails (disk full, I/O error) removes what it began, leaves the pointers on
    the last good checkpoint and is reported as a ``subscriber_error`` event (``subscriber``,
    ``error_type``, ``message`` naming the cause, ``epoch``, ``step``, ``reason``, ``latest``);
    training goes on and the next checkpoint is tried as usual, so saving resumes once the
    cause is gone (counted in ``failed``).

    :param job_id: the job whose checkpoints these are.
    :param job_dir: the job's folder (``<data>/jobs/<job_id>``); checkpoints go under
        ``checkpoints/``.
    :param bus: where ``checkpoint_saved`` is published.
    :param monitor: metric of ``trainer.metrics`` that ranks checkpoints (``val_loss``).
    :param mode: ``min`` or ``max``: whether a lower or higher ``monitor`` is better.
    :param every_n_epochs: save every N epochs (None or 0: only on the other triggers).
    :param every_n_steps: save every N optimizer steps (None: never).
    :param keep_last: how many of the newest checkpoints to keep (at least the newest).
    :param keep_best: how many of the best checkpoints by ``monitor`` to keep.
    :param save_on_pause: save when the job pauses.
    :param save_on_stop: save when the job is stopped.
    :param save_on_failure: save after a failing step (the last good state).
    """

    policy = DeliveryPolicy.LOSSLESS
    types: Iterable[EventType | str] | None = ()  # works through inline callbacks only

    def __init__(
        self,
        *,
        job_id: str,
        job_dir: Path,
        bus: EventBus | None,
        monitor: str = "val_loss",
        mode: Mode = "min",
        every_n_epochs: int | None = 1,
        every_n_steps: int | None = None,
        keep_last: int = 1,
        keep_best: int = 1,
        save_on_pause: bool = True,
        save_on_stop: bool = True,
        save_on_failure: bool = True,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.job_id = job_id
        self._job = job_id
        self.job_dir = Path(job_dir)
        self.bus = bus
        self.monitor = monitor
        self.mode: Mode = mode
        self.every_n_epochs = every_n_epochs or None
        self.every_n_steps = every_n_steps or None
        self.keep_last = max(int(keep_last), 1)
        self.keep_best = max(int(keep_best), 0)
        self.save_on_pause = save_on_pause
        self.save_on_stop = save_on_stop
        self.save_on_failure = save_on_failure

        self._condition = threading.Condition()
        self._pending: _Request | None = None
        self._writing = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._spare: Any = None  # a written snapshot whose memory the next one reuses
        self._requested = self._written = self._replaced = self._failed = 0
        self._waited = 0.0
        self._last_name: str | None = None

        removed = clean_orphans(self.job_dir)
        if removed:
            logger.info("job %s: removed unfinished checkpoint files %s", job_id, removed)
        self._serial = 0
        self._on_disk: list[CheckpointInfo] = []
        self._pointers: dict[str, str | None] = {}
        self._read_disk()
        self._best_value = self._best_on_disk(self._on_disk)
        self._last_step_saved: int | None = None

    def _read_disk(self) -> None:
        """Read the job's checkpoints and pointers from disk (at start and after a failed
        write). In between the writer keeps them itself: it is the only one that writes this
        job's checkpoints while it runs, and listing the folder and reading every manifest
        each write took system calls, each a hand-over of the GIL with the training thread."""
        self._on_disk = list_checkpoints(self.job_dir)  # newest first
        self._pointers = {
            "latest": read_pointer(self.job_dir, "latest"),
            "best": read_pointer(self.job_dir, "best"),
        }
        # the writer numbers its checkpoints on from here
        self._serial = max(self._serial, last_serial(self._on_disk))

    def _best_on_disk(self, infos: list[CheckpointInfo]) -> float | None:
        best = self._best_checkpoint(infos)
        return None if best is None else best.monitor_value

    def _best_checkpoint(self, infos: list[CheckpointInfo]) -> CheckpointInfo | None:
        """The best of ``infos`` (the job's checkpoints, newest first) by the monitored value
        (the newest among equals).

        Read from the manifests, not the ``best`` pointer: a write killed between moving
        ``latest`` and ``best`` leaves that pointer behind, and this puts it right.
        """
        best: CheckpointInfo | None = None
        for info in infos:
            value = info.monitor_value
            if info.monitor != self.monitor or value is None:
                continue
            if best is None or improves(value, best.monitor_value, self.mode):
                best = info
        return best

    # -- training thread --------------------------------------------------------------------

    def bind(self, trainer: TrainerLike) -> None:
        """Register the inline callbacks on ``trainer`` (``on_model_save``, and
        ``on_train_batch_end`` when ``every_n_steps`` is set)."""
        trainer.add_callback("on_model_save", self.on_model_save_callback)
        if self.every_n_steps:
            trainer.add_callback("on_train_batch_end", self.on_train_batch_end_callback)

    def on_model_save_callback(self, trainer: TrainerLike) -> None:
        """The inline ``on_model_save`` callback: decide, snapshot, queue."""
        reason = trainer.save_reason or "command"
        metrics = _numeric(trainer.metrics)
        value = metrics.get(self.monitor)
        improved = (
            self.keep_best > 0
            and value is not None
            and improves(value, self._best_value, self.mode)
        )
        if reason == "epoch_end":
            periodic = (
                bool(self.every_n_epochs) and (trainer.epoch + 1) % (self.every_n_epochs or 1) == 0
            )
            if not (periodic or improved):
                return
            essential = improved
        elif reason in ("pause", "stop", "failure"):
            if not getattr(self, f"save_on_{reason}"):
                return
            essential = True
        else:
            essential = reason in _ESSENTIAL_REASONS
        if improved:
            self._best_value = value
        self.request(trainer, reason, essential=essential, best=improved)

    def on_train_batch_end_callback(self, trainer: TrainerLike) -> None:
        """The inline ``on_train_batch_end`` callback for ``every_n_steps``."""
        n = self.every_n_steps
        step = trainer.step
        if n and step > 0 and step % n == 0 and step != self._last_step_saved:
            # the batches before this checkpoint reach the bus before its checkpoint_saved
            trainer.flush_events()
            self.request(trainer, "step", essential=False, best=False)

    def request(
        self, trainer: TrainerLike, reason: str, *, essential: bool = True, best: bool = False
    ) -> None:
        """Snapshot ``trainer.state_dict()`` to CPU now and queue it for writing."""
        started = time.perf_counter()
        with self._condition:
            spare, self._spare = self._spare, None
        state = snapshot(trainer.state_dict(), spare)
        request = _Request(
            state=state,
            epoch=int(trainer.epoch),
            step=int(trainer.step),
            reason=reason,
            metrics=_numeric(trainer.metrics),
            essential=essential,
            best=best,
            snapshot_seconds=time.perf_counter() - started,
            weights=getattr(trainer, "weights_origin", None),
        )
        self._last_step_saved = request.step
        self._enqueue(request)

    def _enqueue(self, request: _Request) -> None:
        with self._condition:
            self._closed = False  # a closed writer starts a new thread when asked again
            self._requested += 1
            if self._pending is not None and self._pending.essential:
                started = time.perf_counter()
                self._condition.wait_for(lambda: self._pending is None or self._closed)
                self._waited += time.perf_counter() - started
            if self._pending is not None:
                self._replaced += 1
                self._spare = self._pending.state
            self._pending = request
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"checkpoint-writer-{self.job_id}", daemon=True
                )
                self._thread.start()
            self._condition.notify_all()

    # -- writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._pending is not None or self._closed)
                request = self._pending
                if request is None:
                    self._thread = None
                    return
                self._pending = None
                self._writing = True
                self._condition.notify_all()
            try:
                self._write(request)
            except Exception as error:
                logger.exception("job %s: checkpoint at step %d failed", self.job_id, request.step)
                self._failed_write(request, error)
            finally:
                with self._condition:
                    self._writing = False
                    if self._spare is None:
                        self._spare = request.state
                    self._condition.notify_all()

    def _failed_write(self, request: _Request, error: Exception) -> None:
        """Count and report a write that failed (disk full, I/O error): the files it began are
        gone, the pointers still name the last good checkpoint, and training goes on; the
        next checkpoint is tried as usual, so saving resumes once the cause is gone."""
        # a write can fail after its folder was renamed into place (the last fsync), or after
        # a pointer moved: start again from what is on disk, numbering on from there
        self._read_disk()
        on_disk = self._best_on_disk(self._on_disk) if request.best else None
        with self._condition:
            self._failed += 1
            if request.best and not (self._pending is not None and self._pending.best):
                # this value never reached the disk: later epochs must beat what did
                self._best_value = on_disk
        if self.bus is None:
            return
        data = {
            "subscriber": self.name,
            "error_type": type(error).__name__,
            "message": f"checkpoint at epoch {request.epoch}, step {request.step} "
            f"({request.reason}) not saved: {error}",
            "epoch": request.epoch,
            "step": request.step,
            "reason": request.reason,
            "latest": self._pointers["latest"],
        }
        try:
            self.bus.report_error(self, self._job, data)
        except Exception as publish_error:  # a closed bus: the log above still says it
            logger.warning(
                "job %s: checkpoint failure not published: %r", self.job_id, publish_error
            )

    def _write(self, request: _Request) -> None:
        started = time.perf_counter()
        info = write_checkpoint(
            self.job_dir,
            request.state,
            epoch=request.epoch,
            step=request.step,
            reason=request.reason,
            metrics=request.metrics,
            monitor=self.monitor,
            serial=self._serial + 1,
            weights=request.weights,
        )
        self._serial = info.serial
        infos = [info, *self._on_disk]
        self._on_disk = infos
        write_pointer(self.job_dir, "latest", info)
        self._pointers["latest"] = info.name
        best_info = self._best_checkpoint(infos)
        best = best_info is not None and best_info.name == info.name
        if best_info is not None and self._pointers["best"] != best_info.name:
            write_pointer(self.job_dir, "best", best_info)
            self._pointers["best"] = best_info.name
        deleted = apply_retention(
            self.job_dir,
            keep_last=self.keep_last,
            keep_best=self.keep_best,
            mode=self.mode,
            protect=[info.name],
            infos=infos,
            pointed=self._pointers.values(),
        )
        if deleted:
            gone = set(deleted)
            self._on_disk = [kept for kept in infos if kept.name not in gone]
        seconds = request.snapshot_seconds + time.perf_counter() - started
        with self._condition:
            self._written += 1
            self._last_name = info.name
        self._publish(info, request, seconds, best, deleted)

    def _publish(
        self,
        info: CheckpointInfo,
        request: _Request,
        seconds: float,
        best: bool,
        deleted: list[str],
    ) -> None:
        if self.bus is None:
            return
        data = {
            "name": info.name,
            "epoch": info.epoch,
            "step": info.step,
            "reason": request.reason,
            "monitor": self.monitor,
            "metric": info.monitor_value,
            "best": best,
            "bytes": info.bytes,
            "seconds": seconds,
            "snapshot_seconds": request.snapshot_seconds,
            "deleted": deleted,
        }
        try:
            self.bus.publish(self._job, EventType.CHECKPOINT_SAVED, data)
        except Exception as error:  # a closed bus must not lose the checkpoint itself
            logger.warning("job %s: checkpoint_saved not published: %r", self.job_id, error)

    # -- control ----------------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Block until every request so far is written (False on timeout)."""
        with self._condition:
            return self._condition.wait_for(
                lambda: self._pending is None and not self._writing, timeout
            )

    async def aflush(self) -> None:
        """:meth:`flush` without blocking the event loop."""
        await anyio.to_thread.run_sync(self.flush)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued, stop the writer thread and release the snapshot memory."""
        self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
        with self._condition:
            self._spare = None

    def statistics(self) -> CheckpointWriterStatistics:
        """A snapshot of the writer's counters."""
        with self._condition:
            return CheckpointWriterStatistics(
                requested=self._requested,
                written=self._written,
                replaced=self._replaced,
                failed=self._failed,
                pending=self._pending is not None,
                writing=self._writing,
                waited_seconds=self._waited,
                last_checkpoint=self._last_name,
            )

    async def on_stop(self) -> None:
        """Detached from the bus (the job's run ended): finish writing, stop the thread."""
        await anyio.to_thread.run_sync(self.close)


def _numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    result = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            result[str(key)] = float(value)
    return result
