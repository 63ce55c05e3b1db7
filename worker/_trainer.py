"""The Trainer: a real PyTorch loop that publishes the lifecycle vocabulary and obeys the
control channel at batch boundaries. It runs on a worker thread, never on the event loop."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from time import time as _now
from typing import Any

import torch
from torch import nn

from trainbus.bus import (
    CONTROLLER_SOURCES,
    SHUTDOWN_SOURCE,
    CallbackRegistry,
    Command,
    CommandKind,
    ControlChannel,
    Event,
    EventBus,
    EventType,
    Stateful,
)
from trainbus.sdk import BatchEventBuffer

from ._building import build_optimizer, build_scheduler, check_runtime
from ._datasets import DatasetSplit
from ._errors import SpecError
from ._random import JobRandom, ProcessRandom, RandomStreams
from ._registry import Registry, default_registry
from ._spec import JobSpec
from ._state import capture_rng_state, restore_rng_state
from ._threads import torch_threads

__all__ = ["Outcome", "RunResult", "Trainer"]

logger = logging.getLogger(__name__)

STATE_FORMAT = 1
TRAIN_BATCH_START = EventType.TRAIN_BATCH_START
OPTIMIZER_STEP = EventType.OPTIMIZER_STEP
BEFORE_ZERO_GRAD = EventType.BEFORE_ZERO_GRAD
TRAIN_BATCH_END = EventType.TRAIN_BATCH_END
TRAIN_BATCH_TYPES = (TRAIN_BATCH_START, OPTIMIZER_STEP, BEFORE_ZERO_GRAD, TRAIN_BATCH_END)


class Outcome(StrEnum):
    """How a run of the trainer ended."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # paused for a server shutdown; resumable


@dataclass
class RunResult:
    outcome: Outcome
    stop_reason: str | None = None
    error: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)


class _StopRun(Exception):
    """Unwinds the loop once a command or policy ended the run."""

    def __init__(self, result: RunResult) -> None:
        self.result = result


class Trainer:
    """Trains one job. Build it (on a worker thread: it loads data), let subscribers bind
    their inline callbacks and register state, optionally :meth:`load_state_dict`, then
    :meth:`run` on the same or another plain thread.

    Attributes read by inline callbacks: ``job_id``, ``epoch`` (0-based, current or just
    finished), ``step`` (optimizer steps so far), ``metrics`` (latest), ``model``, ``control``,
    ``save_reason`` (while ``on_model_save`` callbacks run), ``weights_origin``.

    ``shares_process``: other trainers train in this process at the same time (jobs as
    threads), so this one keeps its random streams apart from the process's default
    generators; otherwise it seeds and uses those (:mod:`worker._random`).
    """

    def __init__(
        self,
        *,
        job_id: str,
        spec: JobSpec,
        bus: EventBus,
        control: ControlChannel,
        data_dir: Path,
        registry: Registry | None = None,
        fit_epoch_end_timeout: float = 30.0,
        shares_process: bool = False,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.bus = bus
        self.control = control
        self.fit_epoch_end_timeout = fit_epoch_end_timeout
        self.callbacks = CallbackRegistry(on_error=self._report_callback_error)
        self._statefuls: dict[str, Stateful] = {}
        registry = registry or default_registry()

        self.device = check_runtime(spec)
        self.autocast_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[
            spec.precision
        ]

        dataset_entry = registry.dataset(spec.dataset.name)
        self.data: DatasetSplit = dataset_entry.load(
            dataset_entry.params.model_validate(spec.dataset.params),
            spec.seed,
            spec.dataset.val_fraction,
            data_dir,
        )
        # initialisation and dropout draw from the job's own streams, seeded from its seed;
        # swapped in around each draw only where other trainers share the process
        self.random: RandomStreams = (JobRandom if shares_process else ProcessRandom)(
            spec.seed, self.device
        )
        model_entry = registry.model(spec.model.name)
        try:
            with self.random:
                model = model_entry.build(
                    model_entry.params.model_validate(spec.model.params),
                    self.data.num_features,
                    self.data.output_size,
                )
        except ValueError as error:
            raise SpecError(f"model {spec.model.name!r}: {error}") from None
        self.model: nn.Module = model.to(self.device)
        self.loss_fn: nn.Module = (
            nn.CrossEntropyLoss() if self.data.task == "classification" else nn.MSELoss()
        )
        self.optimizer = build_optimizer(spec.optimizer, self.model.parameters())
        self.batches_per_epoch = math.ceil(self._train_samples() / spec.batch_size)
        self.scheduler = build_scheduler(spec, self.optimizer, self.batches_per_epoch)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=spec.precision == "fp16" and self.device.type == "cuda"
        )
        self.x_train = self.data.x_train.to(self.device)
        self.y_train = self.data.y_train.to(self.device)
        self.x_val = self.data.x_val.to(self.device)
        self.y_val = self.data.y_val.to(self.device)

        self.epoch = 0
        self.batch_index = 0  # batches done in the current epoch
        self.step = 0
        self.epoch_complete = False
        self.metrics: dict[str, float] = {}
        self.save_reason: str | None = None
        self.weights_origin: dict[str, Any] | None = None
        """Set by a callback that loads other weights into the model than the ones trained
        last (the best epoch's, at ``on_train_end``), so that a checkpoint says whose they are."""
        self._loss_sum = 0.0
        self._loss_pending: torch.Tensor | None = None  # CUDA: summed on the device
        self._seen = 0
        self._batch_events = BatchEventBuffer(bus, job_id)

    # -- wiring -----------------------------------------------------------------------------

    def add_callback(self, name: str, fn: Callable[[Any], object]) -> None:
        """Run ``fn(trainer)`` inline at ``name`` (Ultralytics style, e.g. ``on_fit_epoch_end``)."""
        self.callbacks.add_callback(name, fn)

    def register_stateful(self, name: str, obj: Stateful) -> None:
        """Save ``obj``'s state in checkpoints under ``controllers[name]`` and restore it."""
        self._statefuls[name] = obj

    def _report_callback_error(self, event_type: EventType, fn: object, error: Exception) -> None:
        self._batch_events.flush()
        self.bus.publish(
            self.job_id,
            EventType.SUBSCRIBER_ERROR,
            {
                "subscriber": getattr(fn, "__qualname__", repr(fn)),
                "callback": f"on_{event_type.value}",
                "error_type": type(error).__name__,
                "message": str(error),
            },
        )

    # -- building ---------------------------------------------------------------------------

    def flush_events(self) -> None:
        """Publish the batch events recorded so far (before publishing, or asking another
        thread to publish, something that happened after them)."""
        self._batch_events.flush()

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where the trainer stands (a batch
        boundary); loadable with ``torch.load(..., weights_only=True)``."""
        return {
            "format": STATE_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "position": {
                "epoch": self.epoch,
                "batch": self.batch_index,
                "step": self.step,
                "epoch_complete": self.epoch_complete,
            },
            "accumulators": {
                "loss_sum": self._folded_loss_sum(),
                "seen": self._seen,
            },
            "metrics": dict(self.metrics),
            "rng": capture_rng_state(self.random),
            "controllers": {name: obj.state_dict() for name, obj in self._statefuls.items()},
            # what worker.load_model needs to rebuild a ready model from the checkpoint alone
            "spec": self.spec.model_dump(mode="json"),
            "preprocessing": self.data.preprocessing(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a :meth:`state_dict` (register stateful objects first)."""
        if state.get("format") != STATE_FORMAT:
            raise SpecError(f"unsupported trainer state format {state.get('format')!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        position = state["position"]
        self.epoch = int(position["epoch"])
        self.batch_index = int(position["batch"])
        self.step = int(position["step"])
        self.epoch_complete = bool(position["epoch_complete"])
        accumulators = state["accumulators"]
        self._loss_sum = float(accumulators["loss_sum"])
        self._loss_pending = None
        self._seen = int(accumulators["seen"])
        self.metrics = {k: float(v) for k, v in state.get("metrics", {}).items()}
        restore_rng_state(state["rng"], self.random)
        for name, controller_state in state.get("controllers", {}).items():
            if name in self._statefuls:
                self._statefuls[name].load_state_dict(controller_state)

    # -- running ----------------------------------------------------------------------------

    def _emit(self, event_type: EventType, data: dict[str, Any]) -> Event:
        self._batch_events.flush()  # what happened before goes out first
        self.callbacks.run_callbacks(event_type, self)
        return self.bus.publish(self.job_id, event_type, data)

    def run(self) -> RunResult:
        """Train to the end, or until a command or a failure ends the run."""
        with torch_threads(self.spec.torch_threads):
            return self._run()

    def _run(self) -> RunResult:
        try:
            self._emit(
                EventType.PRETRAIN_ROUTINE_START,
                {
                    "device": str(self.device),
                    "precision": self.spec.precision,
                    "torch_threads": torch.get_num_threads(),
                    # the devices this process may see (its device slots, in a worker)
                    "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                },
            )
            self._emit(
                EventType.PRETRAIN_ROUTINE_END,
                {
                    "parameters": sum(p.numel() for p in self.model.parameters()),
                    "train_samples": len(self.data.y_train),
                    "val_samples": len(self.data.y_val),
                    "task": self.data.task,
                    "num_classes": self.data.num_classes,
                },
            )
            self._emit(
                EventType.TRAIN_START,
                {
                    "epochs": self.spec.epochs,
                    "batches_per_epoch": self.batches_per_epoch,
                    "epoch": self.epoch,
                    "step": self.step,
                    "resumed": self.step > 0,
                },
            )
            # a run resumed after its last epoch's end has no epoch left to train
            if self.epoch_complete and self.epoch + 1 < self.spec.epochs:
                self._start_next_epoch()
            while not self.epoch_complete:
                self._train_epoch()
                self._validate_and_finish_epoch()
                if self.epoch + 1 < self.spec.epochs:
                    self._check_commands()
                    self._start_next_epoch()
            self._end("end", {"epoch": self.epoch, "step": self.step, "metrics": self.metrics})
            return RunResult(Outcome.COMPLETED)
        except _StopRun as stop:
            return stop.result
        except Exception as error:
            logger.exception("job %s failed", self.job_id)
            self._save_after_failure()
            return RunResult(
                Outcome.FAILED, error={"type": type(error).__name__, "message": str(error)}
            )
        finally:
            with contextlib.suppress(Exception):
                self._emit(EventType.TEARDOWN, {"epoch": self.epoch, "step": self.step})

    def _train_samples(self) -> int:
        """How many training samples an epoch of this trainer draws (a rank of a distributed
        job draws its shard)."""
        return len(self.data.y_train)

    def _reduce_epoch(self, totals: tuple[float, int, int]) -> tuple[float, int, int]:
        """The epoch's summed loss, samples and samples trained in this run, over every rank
        of a distributed job (here: this trainer's own)."""
        return totals

    def _start_next_epoch(self) -> None:
        self.epoch += 1
        self.batch_index = 0
        self.epoch_complete = False
        self._loss_sum = 0.0
        self._loss_pending = None
        self._seen = 0

    def _epoch_order(self) -> torch.Tensor:
        """This epoch's shuffle, a pure function of seed and epoch (so resume reproduces it)."""
        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.y_train), generator=generator).to(self.device)

    def _autocast(self) -> contextlib.AbstractContextManager[object]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _train_epoch(self) -> None:
        spec = self.spec
        every = spec.batch_event_every
        batch_size = spec.batch_size
        record = self._batch_events.train_batch
        run_callbacks = self.callbacks.run_callbacks
        control = self.control
        optimizer = self.optimizer
        scheduler = (
            self.scheduler
            if isinstance(self.scheduler, torch.optim.lr_scheduler.OneCycleLR)
            else None
        )
        scaler = self.scaler
        scaling = scaler.is_enabled()
        mixed = self.autocast_dtype is not None
        loss_fn = self.loss_fn
        model = self.model
        model.train()
        if self.batch_index == 0:
            self._emit(
                EventType.TRAIN_EPOCH_START, {"epoch": self.epoch, "step": self.step, "lr": self.lr}
            )
        order = self._epoch_order()
        started = time.perf_counter()
        samples_at_start = self._seen
        # On the CPU ``.item()`` costs no device sync, so every loss is checked at once; on CUDA
        # the loss is read only for published batches and summed on the device otherwise.
        host_loss = self.device.type != "cuda"
        loss_value = math.nan
        x_train = self.x_train
        y_train = self.y_train
        train_size = len(order)
        callbacks = self.callbacks
        callbacks_version = -1
        inline = True
        batch_started = 0.0
        drawing = self.random
        for batch in range(self.batch_index, self.batches_per_epoch):
            if control.pending:
                self._apply(control.take())
            if callbacks.version != callbacks_version:
                callbacks_version = callbacks.version
                inline = callbacks.has_callbacks(TRAIN_BATCH_TYPES)
            loud = batch % every == 0
            if loud:
                batch_started = _now()
            index = order[batch * batch_size : (batch + 1) * batch_size]
            inputs = x_train[index]
            targets = y_train[index]
            if inline:
                run_callbacks(TRAIN_BATCH_START, self)
            if mixed:
                with drawing, self._autocast():
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
            else:
                with drawing:
                    outputs = model(inputs)
                    loss = loss_fn(outputs, targets)
            count = min(batch_size, train_size - batch * batch_size)  # len(targets), in ints
            if host_loss or loud:
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    self._non_finite(loss_value)
            if host_loss:
                self._loss_sum += loss_value * count
            else:
                weighted = loss.detach() * count
                pending = self._loss_pending
                self._loss_pending = weighted if pending is None else pending + weighted
            if scaling:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            if scheduler is not None:
                scheduler.step()
            self._seen += count
            step = self.step = self.step + 1
            if inline:
                run_callbacks(OPTIMIZER_STEP, self)
                run_callbacks(BEFORE_ZERO_GRAD, self)
            optimizer.zero_grad(set_to_none=True)
            self.batch_index = batch + 1
            if loud:
                # the four batch events go out in bulk (sdk/_batch_events.py); recorded
                # before the callbacks, so that what they publish comes after them
                record(
                    batch_started,
                    self.epoch,
                    batch,
                    step,
                    loss_value,
                    optimizer.param_groups[0]["lr"],
                    count,
                )
            if inline:
                run_callbacks(TRAIN_BATCH_END, self)
        loss_sum = self._folded_loss_sum()
        if not math.isfinite(loss_sum):  # CUDA: a non-finite loss in an unpublished batch
            self._non_finite(loss_sum)
        seconds = time.perf_counter() - started
        loss_sum, seen, trained = self._reduce_epoch(
            (loss_sum, self._seen, self._seen - samples_at_start)
        )
        train = {"train_loss": loss_sum / max(1, seen), "lr": self.lr}
        train["epoch_seconds"] = seconds
        train["samples_per_s"] = trained / seconds if seconds > 0 else 0.0
        self.metrics.update(train)
        self._emit(
            EventType.TRAIN_EPOCH_END,
            {"epoch": self.epoch, "step": self.step, "metrics": dict(train)},
        )

    def _folded_loss_sum(self) -> float:
        """The epoch's summed training loss, folding in what CUDA summed on the device."""
        if self._loss_pending is not None:
            self._loss_sum += float(self._loss_pending)
            self._loss_pending = None
        return self._loss_sum

    def _non_finite(self, value: float) -> None:
        reason = f"non-finite loss ({value}) at epoch {self.epoch}, step {self.step}"
        if self.spec.nonfinite_loss == "stop":
            self._save("stop")
            raise _StopRun(RunResult(Outcome.STOPPED, stop_reason=reason))
        raise FloatingPointError(reason)

    @torch.no_grad()
    def _validate_and_finish_epoch(self) -> None:
        every = self.spec.batch_event_every
        batch_size = self.spec.batch_size
        classification = self.data.task == "classification"
        self.model.eval()
        self._emit(EventType.VAL_START, {"epoch": self.epoch, "step": self.step})
        host_loss = self.device.type != "cuda"
        run_callbacks = self.callbacks.run_callbacks
        record = self._batch_events.val_batch
        batch_started = 0.0
        loss_sum: float | torch.Tensor = 0.0
        predictions: list[torch.Tensor] = []  # compared with the targets once, at the end
        for batch, start in enumerate(range(0, len(self.y_val), batch_size)):
            inputs = self.x_val[start : start + batch_size]
            targets = self.y_val[start : start + batch_size]
            loud = batch % every == 0
            if loud:
                batch_started = _now()
            run_callbacks(EventType.VAL_BATCH_START, self)
            with self.random, self._autocast():
                outputs = self.model(inputs)
                loss = self.loss_fn(outputs, targets)
            loss_value = loss.item() if host_loss or loud else math.nan
            loss_sum += (loss_value if host_loss else loss.detach().float()) * len(targets)
            if classification:
                predictions.append(outputs.argmax(1))
            run_callbacks(EventType.VAL_BATCH_END, self)
            if loud:
                record(batch_started, self.epoch, batch, loss_value)
        loss_sum = float(loss_sum)
        count = max(1, len(self.y_val))
        validation = {"val_loss": loss_sum / count}
        if classification:
            correct = int((torch.cat(predictions) == self.y_val).sum()) if predictions else 0
            validation["val_accuracy"] = correct / count
        else:
            validation["val_mse"] = loss_sum / count
        self.metrics.update(validation)
        self._emit(
            EventType.VAL_END, {"epoch": self.epoch, "step": self.step, "metrics": dict(validation)}
        )
        self.epoch_complete = True
        event = self._emit(
            EventType.FIT_EPOCH_END,
            {"epoch": self.epoch, "step": self.step, "metrics": dict(self.metrics)},
        )
        # Lossless controllers (early stop, LR plateau) decide before the next epoch starts;
        # recorders (the event store) catch up in their own time.
        if not self.bus.wait_processed(event, self.fit_epoch_end_timeout, steering_only=True):
            logger.warning(
                "job %s: controllers did not finish with epoch %d in time", self.job_id, self.epoch
            )
        if self.scheduler is not None and not isinstance(
            self.scheduler, torch.optim.lr_scheduler.OneCycleLR
        ):
            before = self.lr
            self.scheduler.step()
            if self.lr != before:
                self._emit(
                    EventType.PARAMS_UPDATE,
                    {"epoch": self.epoch, "step": self.step, "lr": self.lr, "source": "scheduler"},
                )
        # The epoch-end checkpoint is what an interrupted job resumes from: it must hold the
        # state the next epoch starts with (the scheduler stepped, the controllers' commands
        # applied), or a resumed run would train its next epoch differently.
        self._check_commands()
        if self.epoch + 1 < self.spec.epochs:
            self._save("epoch_end")
        # else the run's ``end`` save follows at once with the same state: one checkpoint,
        # not two (the second cost a short run ~4% in bench/overhead.py)

    def _end(self, save_reason: str, data: dict[str, Any]) -> None:
        """End a completed run: the ``on_train_end`` callbacks run before the final save, so
        that what they change (e.g. the best weights restored) is what the last checkpoint
        holds; then ``model_save`` and ``train_end`` are published, in that order."""
        self._batch_events.flush()
        self.callbacks.run_callbacks(EventType.TRAIN_END, self)
        self._save(save_reason)
        self.bus.publish(self.job_id, EventType.TRAIN_END, data)

    def _check_commands(self) -> None:
        if self.control.pending:
            self._apply(self.control.take())

    # -- commands ---------------------------------------------------------------------------

    def _apply(self, commands: list[Command]) -> None:
        """Apply commands in order; raises :class:`_StopRun` when one ends the run."""
        self._batch_events.flush()  # the batches before the command come first
        for index, command in enumerate(commands):
            kind = command.kind
            if kind is CommandKind.STOP:
                self._stop(command)
            elif kind is CommandKind.PAUSE:
                # the commands taken with the pause are the paused loop's to honour (a stop
                # sent with a pause must not wait for a resume)
                self._pause(command, commands[index + 1 :])
                return
            elif kind is CommandKind.SAVE:
                self._save("command", command)
            elif kind is CommandKind.SET_LR:
                assert command.value is not None
                self._set_lr(command.value)
                self.control.applied(command, step=self.step, epoch=self.epoch, lr=self.lr)
            # a resume while running is a no-op

    def _stop(self, command: Command) -> None:
        self.control.applied(command, step=self.step, epoch=self.epoch)
        reason = command.reason or f"stopped by {command.source}"
        outcome = Outcome.COMPLETED if command.source in CONTROLLER_SOURCES else Outcome.STOPPED
        if outcome is Outcome.COMPLETED:
            self._end(
                "stop",
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "metrics": self.metrics,
                    "stop_reason": reason,
                },
            )
        else:
            self._save("stop")
        raise _StopRun(RunResult(outcome, stop_reason=reason, details={"source": command.source}))

    def _pause(self, command: Command, taken: list[Command]) -> None:
        self.control.applied(command, step=self.step, epoch=self.epoch)
        # a shutdown's pause is what the job resumes from after the restart: always saved
        shutdown = command.source == SHUTDOWN_SOURCE
        self._save("shutdown" if shutdown else "pause")
        commands = taken
        while True:
            for index, next_command in enumerate(commands):
                if next_command.kind is CommandKind.RESUME:
                    self.control.applied(next_command, step=self.step, epoch=self.epoch)
                    self._apply(commands[index + 1 :])
                    return
                if next_command.kind is not CommandKind.PAUSE:
                    self._apply([next_command])
            commands = self.control.wait()
            if not commands and self.control.closed:
                if not shutdown:  # paused by a user, then the server shut down
                    self._save("shutdown")
                raise _StopRun(RunResult(Outcome.INTERRUPTED, stop_reason=command.reason or None))

    def _set_lr(self, value: float) -> None:
        """Set every group's learning rate, rescaling the schedule's anchors with it so that a
        scheduler continues relative to the new value instead of undoing it."""
        for group in self.optimizer.param_groups:
            factor = value / group["lr"] if group["lr"] else 1.0
            group["lr"] = value
            for key in ("initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= factor
        if self.scheduler is not None:
            self.scheduler.base_lrs = [value for _ in self.scheduler.base_lrs]

    def _save(self, reason: str, command: Command | None = None) -> None:
        """Run the ``on_model_save`` callbacks (a checkpoint writer snapshots here) and
        publish ``model_save``."""
        self._batch_events.flush()
        self.save_reason = reason
        try:
            self.callbacks.run_callbacks(EventType.MODEL_SAVE, self)
        finally:
            self.save_reason = None
        metrics = dict(self.metrics)
        if command is not None:  # the command's own reason stays; save_reason says why
            self.control.applied(
                command, step=self.step, epoch=self.epoch, save_reason=reason, metrics=metrics
            )
        else:
            self.bus.publish(
                self.job_id,
                EventType.MODEL_SAVE,
                {
                    "epoch": self.epoch,
                    "step": self.step,
                    "reason": reason,
                    "save_reason": reason,
                    "metrics": metrics,
                },
            )

    def _save_after_failure(self) -> None:
        with contextlib.suppress(Exception):
            self._save("failure")
