"""Ultralytics: callbacks that make a ``YOLO(...).train`` a trainbus job.

::

    from ultralytics import YOLO
    from trainbus.sdk.ultralytics import attach

    model = YOLO("yolov8n.yaml")
    attach(model, "yolo-a")
    model.train(data="coco8.yaml", epochs=10)

Ultralytics' callback vocabulary is the one trainbus's events are named after; each callback
maps onto them with the payloads of the built-in trainer:

========================== ==================================================================
Ultralytics                trainbus
========================== ==================================================================
on_pretrain_routine_end    the run starts (the trainer has its optimizer and data now):
                           ``pretrain_routine_start``, ``pretrain_routine_end``,
                           ``train_start``
on_train_epoch_start       ``train_epoch_start``; commands are applied (a pause holds here)
on_train_batch_end         ``train_batch_start``, ``optimizer_step``, ``before_zero_grad``,
                           ``train_batch_end`` with the batch's loss (the sum of its loss
                           items); commands are applied (a pause holds here)
on_model_save              ``model_save`` (reason ``epoch_end``), after the epoch's events
on_fit_epoch_end           ``train_epoch_end``, ``val_start``, ``val_end``, ``fit_epoch_end``
on_train_end               ``train_end``, ``teardown``; the job ends
teardown                   ends a run that training left by an exception: ``failed`` (or
                           ``interrupted`` on Ctrl-C)
========================== ==================================================================

``on_pretrain_routine_start`` and ``on_train_start`` come with the run's start;
``on_train_epoch_end`` comes before validation, whose metrics the epoch's events carry;
``on_train_batch_start``, ``optimizer_step``, ``on_before_zero_grad`` and
``on_params_update`` add nothing the batch events do not say (and Ultralytics 8.4's trainer
does not fire the last three). The extra ``on_fit_epoch_end`` Ultralytics fires after
training, for its final validation of ``best.pt`` (with ``epoch`` one past the last), is not
an epoch: it publishes nothing.

Metrics are named as trainbus's: ``metrics/mAP50-95(B)`` -> ``val_map50_95``,
``metrics/precision(B)`` -> ``val_precision``, ``val/box_loss`` -> ``val_box_loss``,
``train/box_loss`` -> ``train_box_loss`` (mask metrics end in ``_mask``, pose metrics in
``_pose``), with ``train_loss`` and ``val_loss`` the sums of the loss items and
``val_fitness`` Ultralytics' fitness. Early stopping on mAP: ``early_stop={"enabled": True,
"monitor": "val_map50_95", "mode": "max"}``. ``step`` counts batches (Ultralytics
accumulates the gradients of several batches per optimizer step).

Commands: stop sets ``trainer.stop`` (the epoch ends after the batch, is validated and saved,
and ``train()`` returns normally), pause holds training after the batch until resume, save
writes an Ultralytics checkpoint ``<save_dir>/weights/trainbus-<reason>-step=<step>.pt``
(loadable with ``YOLO(path)``), set_lr sets every parameter group's learning rate and
rescales Ultralytics' schedule (warm-up and decay) to it. Ultralytics keeps its own
checkpoints (``last.pt``, ``best.pt``); to continue a run, ``train(resume=True)`` with the
same run id: the job continues from the epoch Ultralytics resumes at.

Multi-GPU (DDP) training runs in processes Ultralytics starts, which do not carry added
callbacks: report single-process training. This module does not import Ultralytics.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ._run import Run

__all__ = ["TrainbusCallbacks", "UltralyticsTrainer", "attach"]


class UltralyticsTrainer(Protocol):
    """What the callbacks use of Ultralytics' ``BaseTrainer``."""

    epoch: int
    epochs: int
    start_epoch: int
    stop: bool
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    loss_items: Any
    tloss: Any
    metrics: Any
    fitness: Any
    wdir: Path
    last: Path
    best: Path
    save_period: int

    def save_model(self) -> Any: ...


class _CallbackOwner(Protocol):
    """A ``YOLO`` model (or a trainer): what callbacks are added to."""

    def add_callback(self, event: str, func: Callable[[Any], None]) -> None: ...


_LOSS_GROUPS = {"train": "train_", "val": "val_"}
_METRIC_GROUPS = {**_LOSS_GROUPS, "metrics": "val_"}
_TASK_SUFFIXES = {"(B)": "", "(M)": "_mask", "(P)": "_pose"}


def _metric_name(key: str) -> str | None:
    """trainbus's name for an Ultralytics metric key; None for what is not a metric
    (``lr/pg0``: the learning rate is reported on its own)."""
    group, _, name = key.partition("/")
    prefix = _METRIC_GROUPS.get(group)
    if prefix is None or not name:
        return None
    for suffix, replacement in _TASK_SUFFIXES.items():
        if name.endswith(suffix):
            name = name.removesuffix(suffix) + replacement
    words = re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_")
    return prefix + words if words else None


def _values(items: Any) -> list[float]:
    """The loss items' values: a mapping of name to 0-d tensor, or a tensor."""
    if items is None:
        return []
    if isinstance(items, Mapping):
        return [float(value) for value in items.values()]
    return [float(value) for value in items.reshape(-1)]


class TrainbusCallbacks:
    """Reports an Ultralytics training to trainbus as the job of run ``run_id`` and obeys its
    commands. ``options`` are :class:`~trainbus.sdk.Run`'s (``url``, ``token``, ``config``,
    ``early_stop``, ...). Add them to a model with :meth:`attach` (or :func:`attach`)."""

    def __init__(self, run_id: str | None = None, **options: Any) -> None:
        self.run_id = run_id
        self.options = options
        self.run: Run | None = None
        self._trainer: UltralyticsTrainer | None = None
        self._open_epoch: int | None = None
        self._saved = False

    @property
    def callbacks(self) -> dict[str, Callable[[Any], None]]:
        """Ultralytics event name -> callback, as :meth:`attach` adds them."""
        return {
            "on_pretrain_routine_end": self.on_pretrain_routine_end,
            "on_train_epoch_start": self.on_train_epoch_start,
            "on_train_batch_end": self.on_train_batch_end,
            "on_model_save": self.on_model_save,
            "on_fit_epoch_end": self.on_fit_epoch_end,
            "on_train_end": self.on_train_end,
            "teardown": self.teardown,
        }

    def attach(self, model: _CallbackOwner) -> TrainbusCallbacks:
        """Add the callbacks to ``model`` (a ``YOLO`` model, or a trainer); returns self."""
        for event, callback in self.callbacks.items():
            model.add_callback(event, callback)
        return self

    def on_pretrain_routine_end(self, trainer: UltralyticsTrainer) -> None:
        self._trainer = trainer
        self._open_epoch = None
        first_epoch = int(trainer.start_epoch or 0)
        from_step = first_epoch * len(trainer.train_loader) if first_epoch else None
        run = Run(
            self.run_id,
            epochs=int(trainer.epochs),
            model=trainer.model,
            optimizer=trainer.optimizer,
            on_save=self._save,
            on_set_lr=self._rescale_schedule,
            from_step=from_step,
            epoch_checkpoints=False,  # Ultralytics writes last.pt and best.pt
            **self.options,
        )
        self.run = run.start(first_epoch=first_epoch)

    def on_train_epoch_start(self, trainer: UltralyticsTrainer) -> None:
        if self.run is None:
            return
        self._open_epoch = trainer.epoch
        self._saved = False
        self.run.begin_epoch(trainer.epoch)
        if self.run.check():  # a pause holds here
            trainer.stop = True  # read after the next batch

    def on_train_batch_end(self, trainer: UltralyticsTrainer) -> None:
        if self.run is None:
            return
        losses = _values(trainer.loss_items)
        self.run.log_batch(sum(losses) if losses else None)
        if self.run.check():  # a pause holds here, between this batch and the next
            trainer.stop = True

    def on_model_save(self, trainer: UltralyticsTrainer) -> None:
        self._saved = True  # published after the epoch's events, as the built-in trainer does

    def on_fit_epoch_end(self, trainer: UltralyticsTrainer) -> None:
        run = self.run
        if run is None or self._open_epoch is None or trainer.epoch != self._open_epoch:
            return  # the final validation of best.pt, after the last epoch
        self._open_epoch = None
        run.end_epoch(**self._epoch_metrics(trainer))  # the server's controllers decide first
        if self._saved:
            run.save("epoch_end")
            self._saved = False
        if run.should_stop:
            trainer.stop = True

    def on_train_end(self, trainer: UltralyticsTrainer) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def teardown(self, trainer: UltralyticsTrainer) -> None:
        """Ultralytics' last callback, also when training raised (then without
        ``on_train_end``): the run ends with what ended it."""
        if self.run is None:
            return
        error = sys.exception()
        if error is None:
            self.run.finish()
        elif isinstance(error, KeyboardInterrupt):
            self.run.finish("interrupted", reason="interrupted (KeyboardInterrupt)")
        else:
            self.run.finish("failed", error=error)
        self.run = None

    @staticmethod
    def _epoch_metrics(trainer: UltralyticsTrainer) -> dict[str, float]:
        metrics: dict[str, float] = {}
        train_losses = trainer.tloss
        if isinstance(train_losses, Mapping):
            for name, value in train_losses.items():
                metrics[f"train_{name}"] = float(value)
        losses = _values(train_losses)
        if losses:
            metrics["train_loss"] = sum(losses)
        val_losses: list[float] = []
        for key, value in (trainer.metrics or {}).items():
            name = _metric_name(str(key))
            if name is None or value is None:
                continue
            metrics[name] = float(value)
            if str(key).startswith("val/"):
                val_losses.append(float(value))
        if val_losses:
            metrics["val_loss"] = sum(val_losses)
        if trainer.fitness is not None:
            metrics["val_fitness"] = float(trainer.fitness)
        return metrics

    def _save(self, step: int, reason: str) -> None:
        if reason == "epoch_end":
            return  # Ultralytics wrote it (on_model_save)
        trainer = self._trainer
        assert trainer is not None
        # Ultralytics' own checkpoint, written to a file of its own: last.pt and best.pt
        # stay what Ultralytics made them (a mid-epoch best.pt would claim a fitness its
        # weights never had)
        path = Path(trainer.wdir) / f"trainbus-{reason}-step={step}.pt"
        last, best, period = trainer.last, trainer.best, trainer.save_period
        trainer.last = trainer.best = path
        trainer.save_period = 0
        try:
            trainer.save_model()
        finally:
            trainer.last, trainer.best, trainer.save_period = last, best, period

    def _rescale_schedule(self, value: float) -> None:
        """Ultralytics recomputes each group's rate from ``initial_lr`` (warm-up, each
        batch) and the scheduler's ``base_lrs`` (each epoch): both follow the new value."""
        trainer = self._trainer
        if trainer is None or trainer.optimizer is None:
            return
        for group in trainer.optimizer.param_groups:
            group["initial_lr"] = value
        scheduler = trainer.scheduler
        if scheduler is not None and hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs = [value for _ in scheduler.base_lrs]


def attach(model: _CallbackOwner, run_id: str | None = None, **options: Any) -> TrainbusCallbacks:
    """Report ``model``'s next ``train`` to trainbus as the job of run ``run_id``: adds
    :class:`TrainbusCallbacks` to it and returns them. ``options`` are
    :class:`~trainbus.sdk.Run`'s (``url``, ``token``, ``config``, ``early_stop``, ...)."""
    return TrainbusCallbacks(run_id, **options).attach(model)
