"""A run: the user's own training process as a trainbus job.

The training loop stays the user's, on the thread that calls it. What trainbus needs runs
beside it on a thread of its own: an event bus, and the bridge that carries the run's events
to the server over the worker protocol and its commands back (``docs/PROTOCOL.md``). The loop
publishes by handing events to that bus (batch events go out in bulk, about ten times a
second) and obeys commands at the batch boundaries it gives the run (:meth:`Run.check`,
which :meth:`Run.batches` calls before each batch):

- pause holds the loop there, after a checkpoint, until resume or stop;
- stop ends the loop: :meth:`Run.epochs` and :meth:`Run.batches` end, and the run ends
  ``stopped`` (``completed`` when a controller such as early stopping stopped it);
- save writes a checkpoint (the run's own, or the user's ``on_save`` hook);
- set_lr sets every parameter group's learning rate (or calls ``on_set_lr``).

Each command is acknowledged with the step at which it took effect, as for built-in jobs.

When the server cannot be reached: at start, :func:`init` retries for ``connect_timeout``
seconds and then raises :class:`~trainbus.sdk.ServerUnreachable`; once running, training goes
on and the events wait in memory (bounded: ``MAX_BACKLOG_EVENTS``, after which the loop waits
at its next publish until the server is back, so that nothing is lost); the bridge reconnects
for as long as the process runs, attaches again to a restarted server, and sends what the
server does not have yet: the job's stream stays gap-free, with no duplicate.

Under ``torchrun`` (``torch.distributed`` initialised, more than one process): rank 0
attaches and publishes; the other ranks attach nothing and publish nothing, and every rank
applies rank 0's commands at the same batch boundary (``sdk/_agreement.py``). A single
process exchanges nothing.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import CancelledError, Future
from pathlib import Path
from types import TracebackType
from typing import Any

import anyio
import anyio.to_thread
from anyio.from_thread import BlockingPortal

from trainbus.bus import (
    CONTROLLER_SOURCES,
    SHUTDOWN_SOURCE,
    Command,
    CommandKind,
    ControlChannel,
    Event,
    EventBus,
    EventType,
    SubscriberHandle,
)

from ._agreement import AgreedControl, process_rank
from ._attach import Attachment, ServerAddress, attach_run
from ._batch_events import BatchEventBuffer
from ._bridge import ServerBridge
from ._checkpoint import load_run_checkpoint, save_run_checkpoint
from ._errors import RunRefused
from ._loop import LoopThread
from ._protocol import RUN_ID_PATTERN

__all__ = ["MAX_BACKLOG_EVENTS", "Run", "init"]

logger = logging.getLogger(__name__)

MAX_BACKLOG_EVENTS = ServerBridge.buffer_size + ServerBridge.window
"""Events a run holds while the server is away before its loop waits for it."""

SaveHook = Callable[[int, str], None]
"""``(step, reason)``: the user's own checkpoint, in place of the run's."""
LearningRateHook = Callable[[float], None]


class Run:
    """One run of the user's training code, attached to a trainbus server as a job.

    Made by :func:`init`; see the module's documentation for what it does while training.
    ``epoch`` (from 0), ``step`` (optimizer steps), ``metrics`` (the latest of each) and
    ``should_stop`` say where the run is.
    """

    def __init__(
        self,
        run_id: str | None = None,
        *,
        url: str | None = None,
        token: str | None = None,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        epochs: int | None = None,
        model: Any = None,
        optimizer: Any = None,
        checkpoint_dir: str | os.PathLike[str] | None = None,
        on_save: SaveHook | None = None,
        on_set_lr: LearningRateHook | None = None,
        early_stop: Mapping[str, Any] | None = None,
        lr_plateau: Mapping[str, Any] | None = None,
        stall_timeout_seconds: float | None = None,
        from_step: int | None = None,
        epoch_checkpoints: bool = True,
        batch_events_every: int = 1,
        connect_timeout: float = 30.0,
        fit_epoch_end_timeout: float = 30.0,
        finish_timeout: float = 30.0,
    ) -> None:
        run_id = run_id or os.environ.get("TRAINBUS_RUN_ID") or uuid.uuid4().hex[:12]
        if not re.match(RUN_ID_PATTERN, run_id):
            raise RunRefused(
                f"run id {run_id!r}: use 1 to 64 letters, digits, '_', '.' or '-', "
                "starting with a letter or digit"
            )
        if batch_events_every < 1:
            raise RunRefused(f"batch_events_every must be at least 1, got {batch_events_every}")
        self.run_id = run_id
        self.server = ServerAddress.resolve(url, token)
        self.model = model
        self.optimizer = optimizer
        self._checkpoint_root = Path(checkpoint_dir or "trainbus-checkpoints")
        self.checkpoint_folder = (
            self._checkpoint_root / run_id if model is not None and on_save is None else None
        )
        self.on_save = on_save
        self.on_set_lr = on_set_lr
        self.total_epochs = epochs
        self.epoch_checkpoints = epoch_checkpoints
        self._from_step = from_step
        self.batch_events_every = batch_events_every
        self.connect_timeout = connect_timeout
        self.fit_epoch_end_timeout = fit_epoch_end_timeout
        self.finish_timeout = finish_timeout
        config = dict(config or {})
        try:
            json.dumps(config, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise RunRefused(
                f"config must be JSON (finite numbers, strings, lists, objects): {error}"
            ) from None
        request: dict[str, Any] = {"name": name, "config": config, "epochs": epochs}
        request.update(
            (key, value)
            for key, value in (
                ("early_stop", early_stop),
                ("lr_plateau", lr_plateau),
                ("stall_timeout_seconds", stall_timeout_seconds),
            )
            if value is not None
        )
        self._request = request
        controllers = (early_stop, lr_plateau)
        self._controlled = any(bool(c and c.get("enabled")) for c in controllers)
        """Whether the server runs controllers for this run (then each epoch waits for them)."""
        self.epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.should_stop = False
        self.stop_reason: str | None = None
        self._stop_source: str | None = None
        self.paused = False
        self.job_id: str | None = None
        self.resumed_from_step: int | None = None
        self._first_epoch = 0
        self._batch_in_epoch = 0
        self._batch_started = 0.0
        self._batch_logged = False
        self._epoch_ended = False
        self._finished = False
        self._stack = contextlib.ExitStack()
        self._portal: BlockingPortal | None = None
        self._bus: EventBus | None = None
        self._bridge: ServerBridge | None = None
        self._bridge_handle: SubscriberHandle | None = None
        self._bridge_task: Future[None] | None = None
        self._bridge_scope: anyio.CancelScope | None = None
        self._batches: BatchEventBuffer | None = None
        self._channel: ControlChannel | None = None
        self._control: ControlChannel | AgreedControl | None = None
        """What the loop takes commands from: the run's channel, or, under ``torchrun``,
        rank 0's commands as every rank agrees on them."""
        self._rank: int | None = None
        self._launched: Attachment | None = None

    @classmethod
    def for_launched_job(
        cls, job_id: str, *, worker_url: str, worker_token: str, **options: Any
    ) -> Run:
        """A run of the job a server launched this process for (a registered program in its
        worker process): it holds the job's credential for ``worker_url`` and attaches with
        it, not with ``PUT /runs``. ``options`` are :class:`Run`'s; call :meth:`start`."""
        scheme, rest = worker_url.split("://", 1)
        base = rest.removesuffix(f"/jobs/{job_id}/worker")
        url = f"{'https' if scheme == 'wss' else 'http'}://{base}"
        run = cls(job_id, url=url, token=worker_token, **options)
        run._launched = Attachment(job_id, worker_token, created=False, record={})
        return run

    def watch(self, model: Any, optimizer: Any = None) -> None:
        """Checkpoint ``model`` (and ``optimizer``) on pause, save and at each epoch's end,
        and set ``optimizer``'s learning rate on ``set_lr``: for a run started before its
        model existed (a registered program gets its run already started)."""
        self.model = model
        self.optimizer = optimizer
        if self.on_save is None:
            self.checkpoint_folder = self._checkpoint_root / self.run_id

    def log_output(self, stream: str, line: str, **fields: Any) -> None:
        """Publish one line of the process's output as a ``log`` event (any thread)."""
        bus, job_id = self._bus, self.job_id
        if bus is None or job_id is None or self._finished:
            return
        bus.publish(job_id, EventType.LOG, {"stream": stream, "line": line, **fields})

    # -- start ------------------------------------------------------------------------------

    def start(self, *, first_epoch: int | None = None) -> Run:
        """Continue from the run's checkpoint if it has one, attach to the server and start
        the bridge. Called by :func:`init`. ``first_epoch``: where a framework that restored
        its own checkpoint continues.

        :raises ServerUnreachable: if no server answered within ``connect_timeout``.
        :raises RunRefused: if the server refused the run.
        """
        if self._portal is not None or self._control is not None:
            return self
        from_step = self._restore()
        if first_epoch is not None:
            self.epoch = self._first_epoch = first_epoch
        self._rank = process_rank()
        if self._follower:  # rank 0 reports the run; this rank follows its commands
            assert self._rank is not None
            self._control = AgreedControl(None, rank=self._rank)
            atexit.register(self._at_exit)
            return self
        request = {**self._request, **({} if from_step is None else {"from_step": from_step})}
        attachment = self._launched or attach_run(
            self.server, self.run_id, request, timeout=self.connect_timeout
        )
        self.job_id = attachment.job_id
        try:
            self._start_bridge(attachment)
        except BaseException:
            self._stack.close()
            raise
        parameters = None
        if self.model is not None:
            parameters = sum(p.numel() for p in self.model.parameters())
        self._emit(EventType.PRETRAIN_ROUTINE_START, {"device": self._device(), "sdk": True})
        self._emit(EventType.PRETRAIN_ROUTINE_END, {"parameters": parameters})
        start: dict[str, Any] = {
            "epochs": self.total_epochs,
            "batches_per_epoch": None,
            "epoch": self._first_epoch,
            "step": self.step,
            "resumed": from_step is not None,
        }
        if from_step is not None:
            start["from_step"] = from_step  # the history after it is rewound
        self._emit(EventType.TRAIN_START, start)
        atexit.register(self._at_exit)
        return self

    def _at_exit(self) -> None:
        """The process exits with the run unfinished (no ``with`` block, or an uncaught
        exception): say how it ended, so that the job does not wait to be counted lost."""
        error = getattr(sys, "last_value", None)
        if error is None or isinstance(error, KeyboardInterrupt):
            self.finish("interrupted", reason="the process exited without finishing the run")
        else:
            self.finish("failed", error=error)

    def _restore(self) -> int | None:
        """Load the run's checkpoint into the model and optimizer; the step it was taken at
        (or the ``from_step`` given: a framework restored its own checkpoint)."""
        if self._from_step is not None:
            self.step = self.resumed_from_step = self._from_step
            return self._from_step
        if self.checkpoint_folder is None:
            return None
        state = load_run_checkpoint(self.checkpoint_folder)
        if state is None:
            return None
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and "optimizer" in state:
            self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.epoch = int(state["epoch"])
        self.metrics = dict(state.get("metrics", {}))
        # a run continues at the start of the epoch its checkpoint was taken in, or after it
        self._first_epoch = self.epoch + 1 if state.get("epoch_complete") else self.epoch
        self.resumed_from_step = self.step
        logger.info("run %s continues from its checkpoint at step %d", self.run_id, self.step)
        return self.step

    def _start_bridge(self, attachment: Attachment) -> None:
        loop = LoopThread()
        portal = loop.start()
        self._stack.callback(loop.stop)
        self._portal = portal
        bus = self._stack.enter_context(portal.wrap_async_context_manager(EventBus()))
        self._bus = bus
        job_id = attachment.job_id
        self._channel = ControlChannel(job_id, publish=self._publish_applied)
        self._control = self._channel
        if self._rank is not None:
            self._control = AgreedControl(self._channel, rank=self._rank)
        bridge = portal.call(self._new_bridge, attachment)
        self._bridge = bridge
        self._bridge_task = portal.start_task_soon(self._run_bridge, bridge)
        self._bridge_handle = portal.call(bus.attach, bridge)
        self._batches = BatchEventBuffer(bus, job_id)

    async def _run_bridge(self, bridge: ServerBridge) -> None:
        with anyio.CancelScope() as scope:
            self._bridge_scope = scope
            await bridge.run()

    def _new_bridge(self, attachment: Attachment) -> ServerBridge:
        assert self._channel is not None
        bridge = ServerBridge(
            job_id=attachment.job_id,
            url=self.server.worker_url(attachment.job_id),
            token=attachment.worker_token,
            control=self._channel,
            progress=lambda: {"step": self.step, "epoch": self.epoch, "paused": self.paused},
            first_connect_timeout=self.connect_timeout,
            # the user's process: keep trying while it runs (a launched one ends with its server)
            reconnect_timeout=None if self._launched is None else 1.0,
            reattach=self._reattach if self._launched is None else None,
        )
        bridge.on_server_gone.append(lambda: self._let_go(bridge))
        return bridge

    async def _reattach(self) -> str:
        """A restarted server no longer knows this process's credential: attach again (the
        same run id names the same job) and continue where the server's store left off."""
        attachment = await anyio.to_thread.run_sync(
            lambda: attach_run(self.server, self.run_id, self._request, timeout=3600.0)
        )
        logger.info("run %s attached again to job %s", self.run_id, attachment.job_id)
        return attachment.worker_token

    def _let_go(self, bridge: ServerBridge) -> None:
        """The server refused this process for good (another process of the run took over,
        or the run ended there): the loop stops at its next boundary."""
        logger.warning("run %s: %s; the run stops", self.run_id, bridge.refused)
        self.should_stop = True
        self.stop_reason = bridge.refused
        if self._channel is not None:
            self._channel.close()

    @property
    def _follower(self) -> bool:
        """Whether this process is a rank other than 0 (it reports nothing)."""
        return self._rank is not None and self._rank != 0

    def _device(self) -> str:
        if self.model is None:
            return "unknown"
        with contextlib.suppress(StopIteration, AttributeError):
            return str(next(self.model.parameters()).device)
        return "unknown"

    # -- the loop ---------------------------------------------------------------------------

    def epochs(self) -> Iterator[int]:
        """The epochs left to train (all of them, or those after the checkpoint's); ends
        early when the run is stopped. An epoch the loop did not close with
        :meth:`end_epoch` is closed with the metrics logged so far."""
        epoch = self._first_epoch
        while (self.total_epochs is None or epoch < self.total_epochs) and not self.check():
            self.begin_epoch(epoch)
            yield epoch
            if not self._epoch_ended:
                self.end_epoch()
            epoch += 1

    def begin_epoch(self, epoch: int) -> None:
        """Epoch ``epoch`` starts (:meth:`epochs` calls it): publishes ``train_epoch_start``."""
        self.epoch = epoch
        self._batch_in_epoch = 0
        self._epoch_ended = False
        self._emit(EventType.TRAIN_EPOCH_START, {"epoch": epoch, "step": self.step, "lr": self.lr})

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """``batches`` (a data loader), obeying commands before each one; ends early when
        the run is stopped. A batch the loop did not log with :meth:`log_batch` counts as
        one optimizer step without a loss."""
        for batch in batches:
            if self.check():
                return
            self._batch_started = time.time()
            self._batch_logged = False
            yield batch
            if not self._batch_logged:
                self.log_batch()

    def log_batch(
        self, loss: Any = None, *, batch_size: int | None = None, step: int | None = None
    ) -> None:
        """One batch done: publishes its events (every ``batch_events_every``-th batch) with
        its loss (a float or a 0-d tensor). ``step``: the optimizer steps so far, where a
        framework counts them (default: one more than before)."""
        batch = self._batch_in_epoch
        self.step = self.step + 1 if step is None else step
        self._batch_in_epoch += 1
        self._batch_logged = True
        if batch % self.batch_events_every or self._follower:
            return
        if loss is None:
            value = math.nan
        else:  # a tensor's value, without its graph
            value = float(loss.detach() if hasattr(loss, "detach") else loss)
        assert self._batches is not None, "start the run first: trainbus.sdk.init(...)"
        started = self._batch_started or time.time()
        self._batches.train_batch(
            started, self.epoch, batch, self.step, value, self.lr or 0.0, batch_size or 0
        )
        self._batch_started = 0.0

    def end_epoch(self, **metrics: float) -> None:
        """Close the epoch with its metrics (``train_loss``, ``val_loss``, ``val_accuracy``,
        ...): publishes ``train_epoch_end``, ``val_end`` (with the ``val_*`` ones) and
        ``fit_epoch_end``, waits for the server's controllers (early stopping, LR plateau,
        when the run has them) to decide on it, applies what they sent, and saves the epoch's
        checkpoint."""
        values = {key: float(value) for key, value in metrics.items()}
        train = {k: v for k, v in values.items() if not k.startswith("val_")}
        if self.lr is not None:
            train["lr"] = self.lr
        validation = {k: v for k, v in values.items() if k.startswith("val_")}
        self.metrics.update(train)
        self.metrics.update(validation)
        self._emit(
            EventType.TRAIN_EPOCH_END, {"epoch": self.epoch, "step": self.step, "metrics": train}
        )
        if validation:
            self._emit(EventType.VAL_START, {"epoch": self.epoch, "step": self.step})
            self._emit(
                EventType.VAL_END,
                {"epoch": self.epoch, "step": self.step, "metrics": validation},
            )
        self._epoch_ended = True
        event = self._emit(
            EventType.FIT_EPOCH_END,
            {"epoch": self.epoch, "step": self.step, "metrics": dict(self.metrics)},
        )
        if self._controlled and event is not None:
            self._wait_for_controllers(event)
        self.check()  # under torchrun every rank takes the controllers' decision here
        last = self.total_epochs is not None and self.epoch + 1 >= self.total_epochs
        if self.epoch_checkpoints and not last and not self.should_stop:
            self.save("epoch_end")

    def _wait_for_controllers(self, event: Event) -> None:
        """The server acknowledges ``fit_epoch_end`` once its controllers have decided on
        it, and sends their commands first."""
        assert self._portal is not None and self._bridge is not None
        bridge = self._bridge
        if not self._portal.call(bridge.wait_acked, event.seq, self.fit_epoch_end_timeout):
            logger.warning(
                "run %s: the server did not confirm epoch %d in time (it is away or slow): "
                "its controllers' decisions on it apply when they arrive",
                self.run_id,
                self.epoch,
            )

    # -- commands ---------------------------------------------------------------------------

    def check(self) -> bool:
        """Apply the commands that arrived (a pause holds here until resumed); whether the
        run should stop."""
        control = self._control
        if control is not None and control.pending:
            self._apply(control.take())
            if control.closed and not self.should_stop:  # rank 0's run was let go: all stop
                self.should_stop = True
                self.stop_reason = "the server let rank 0's run go"
        return self.should_stop

    def _apply(self, commands: list[Command]) -> None:
        control = self._control
        assert control is not None
        for index, command in enumerate(commands):
            kind = command.kind
            if kind is CommandKind.STOP:
                self._stop(command)
                return
            if kind is CommandKind.PAUSE:
                self._pause(command, commands[index + 1 :])
                return
            if kind is CommandKind.SAVE:
                self.save("command", command)
            elif kind is CommandKind.SET_LR:
                assert command.value is not None
                self._set_lr(command.value)
                control.applied(command, step=self.step, epoch=self.epoch, lr=self.lr)
            # a resume while running is a no-op

    def _stop(self, command: Command) -> None:
        assert self._control is not None
        self._control.applied(command, step=self.step, epoch=self.epoch)
        self.should_stop = True
        self.stop_reason = command.reason or f"stopped by {command.source}"
        self._stop_source = command.source

    def _pause(self, command: Command, rest: list[Command]) -> None:
        control = self._control
        assert control is not None
        control.applied(command, step=self.step, epoch=self.epoch)
        self.paused = True
        self.save("pause")
        commands = rest
        try:
            while True:
                for index, waiting in enumerate(commands):
                    if waiting.kind is CommandKind.RESUME:
                        control.applied(waiting, step=self.step, epoch=self.epoch)
                        self.paused = False
                        self._apply(commands[index + 1 :])
                        return
                    if waiting.kind is CommandKind.STOP:
                        self._stop(waiting)
                        return
                    if waiting.kind is not CommandKind.PAUSE:
                        self._apply([waiting])
                if control.closed:  # the server shut down while the run was held here
                    self.should_stop = True
                    self.stop_reason = self.stop_reason or command.reason or "shut down"
                    self._stop_source = self._stop_source or command.source
                    return
                commands = control.wait(timeout=1.0)
        finally:
            self.paused = False

    def _set_lr(self, value: float) -> None:
        if self.on_set_lr is not None:
            self.on_set_lr(value)
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = value

    @property
    def lr(self) -> float | None:
        """The first parameter group's learning rate (None without an optimizer)."""
        if self.optimizer is None or not self.optimizer.param_groups:
            return None
        return float(self.optimizer.param_groups[0]["lr"])

    # -- checkpoints ------------------------------------------------------------------------

    def save(self, reason: str = "user", command: Command | None = None) -> None:
        """Write a checkpoint now (the run's own, or ``on_save``) and publish ``model_save``."""
        if self._batches is not None:
            self._batches.flush()
        if self.on_save is not None:
            self.on_save(self.step, reason)
        elif self.checkpoint_folder is not None and not self._follower:
            state: dict[str, Any] = {
                "model": self.model.state_dict(),
                "epoch": self.epoch,
                "step": self.step,
                "epoch_complete": self._epoch_ended,
                "metrics": dict(self.metrics),
                "run_id": self.run_id,
            }
            if self.optimizer is not None:
                state["optimizer"] = self.optimizer.state_dict()
            save_run_checkpoint(self.checkpoint_folder, state)
        metrics = dict(self.metrics)
        if command is not None:
            assert self._control is not None
            self._control.applied(
                command, step=self.step, epoch=self.epoch, save_reason=reason, metrics=metrics
            )
            return
        self._emit(
            EventType.MODEL_SAVE,
            {
                "epoch": self.epoch,
                "step": self.step,
                "reason": reason,
                "save_reason": reason,
                "metrics": metrics,
            },
        )

    # -- the end ----------------------------------------------------------------------------

    def finish(
        self,
        outcome: str | None = None,
        *,
        error: BaseException | None = None,
        reason: str | None = None,
    ) -> bool:
        """End the run: ``completed`` (or ``stopped`` after a stop from the API), ``failed``
        with ``error``, or ``interrupted`` (resumable with the same run id). Waits up to
        ``finish_timeout`` for the server to have every event; whether it confirmed."""
        if self._finished or (self._portal is None and not self._follower):
            return False
        self._finished = True
        atexit.unregister(self._at_exit)
        if self._follower:
            completed = (outcome or self._outcome()) == "completed"
            if completed and self.epoch_checkpoints and self.on_save is not None:
                # as rank 0 does: the user's hook may be a collective
                self.on_save(self.step, "stop" if self.should_stop else "end")
            return False
        try:
            outcome = outcome or self._outcome()
            details: dict[str, Any] = {}
            error_body = None
            if error is not None:
                error_body = {
                    "type": type(error).__name__,
                    "message": str(error)[:2000],
                    "stderr_tail": _traceback_tail(error),
                }
            stop_reason = reason or self.stop_reason
            if outcome == "completed":
                if self.epoch_checkpoints and (self.checkpoint_folder or self.on_save):
                    self.save("stop" if self.should_stop else "end")
                end: dict[str, Any] = {
                    "epoch": self.epoch,
                    "step": self.step,
                    "metrics": dict(self.metrics),
                }
                if self.should_stop and stop_reason:
                    end["stop_reason"] = stop_reason
                self._emit(EventType.TRAIN_END, end)
            elif outcome in ("stopped", "interrupted") and self.checkpoint_folder is not None:
                self.save("stop" if outcome == "stopped" else "shutdown")
            if self._stop_source is not None:
                details["source"] = self._stop_source
            self._emit(EventType.TEARDOWN, {"epoch": self.epoch, "step": self.step})
            result = {
                "outcome": outcome,
                "stop_reason": stop_reason,
                "error": error_body,
                "details": details,
                "epoch": self.epoch,
                "step": self.step,
                "metrics": dict(self.metrics),
            }
            return self._deliver(result)
        finally:
            self._stack.close()

    def _outcome(self) -> str:
        if self.should_stop and self._stop_source == SHUTDOWN_SOURCE:
            return "interrupted"  # it continues when the server resumes the job
        if self.should_stop and self._stop_source not in (None, *CONTROLLER_SOURCES):
            return "stopped"
        return "completed"

    def _deliver(self, result: dict[str, Any]) -> bool:
        portal, bus, bridge = self._portal, self._bus, self._bridge
        assert portal is not None and bus is not None and bridge is not None
        handle = self._bridge_handle
        if handle is not None:
            portal.call(handle.detach)  # every event handed to the bridge
        job_id = self.job_id
        assert job_id is not None
        last = bus.last_seq(job_id)
        delivered: bool = portal.call(bridge.finish, result, last, self.finish_timeout)
        if not delivered:
            logger.warning(
                "run %s: the server did not confirm the run's end within %.0f s; its job "
                "ends interrupted there, and continues if the run is started again",
                self.run_id,
                self.finish_timeout,
            )
        if self._bridge_task is not None:  # its connection closes before the loop goes
            portal.call(bridge.close)
            try:
                self._bridge_task.result(timeout=10)
            except Exception:  # it did not end in time: cancel it
                if self._bridge_scope is not None:
                    portal.call(self._bridge_scope.cancel)
                with contextlib.suppress(Exception, CancelledError):
                    self._bridge_task.result(timeout=10)
        return delivered

    def _emit(self, event_type: EventType, data: dict[str, Any]) -> Event | None:
        if self._follower:
            return None
        bus, job_id = self._bus, self.job_id
        assert bus is not None and job_id is not None, "start the run first"
        if self._batches is not None:
            self._batches.flush()  # what happened before goes out first
        return bus.publish(job_id, event_type, data)

    def _publish_applied(
        self, job_id: str, event_type: EventType, data: Mapping[str, Any]
    ) -> Event:
        event = self._emit(event_type, dict(data))
        assert event is not None  # rank 0 or a single process: the only ones with a channel
        return event

    def __enter__(self) -> Run:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if error is None:
            self.finish()
        elif isinstance(error, KeyboardInterrupt):
            self.finish("interrupted", reason="interrupted (KeyboardInterrupt)")
        else:
            self.finish("failed", error=error)


def _traceback_tail(error: BaseException, lines: int = 20) -> str:
    """The last lines of ``error``'s traceback, as Python prints it."""
    text = "".join(traceback.format_exception(error))
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def init(run_id: str | None = None, **options: Any) -> Run:
    """Attach this process to a trainbus server as the job of run ``run_id`` and return the
    started :class:`Run` (use it as a context manager, or call :meth:`Run.finish`).

    The same ``run_id`` always names the same job: a process started again with it continues
    that job, from the run's checkpoint when it has one. ``options`` are :class:`Run`'s.
    """
    return Run(run_id, **options).start()
