"""Hugging Face Transformers: a ``TrainerCallback`` that makes a ``Trainer.train`` a trainbus
job.

::

    from trainbus.sdk.huggingface import TrainbusCallback

    trainer = Trainer(model, args, train_dataset=..., eval_dataset=...,
                      callbacks=[TrainbusCallback("bert-a")])
    trainer.train()

The Trainer's events map onto the built-in vocabulary: ``on_epoch_begin`` ->
``train_epoch_start``, ``on_step_end`` -> the batch events (with the loss of the latest
``on_log``: set ``logging_steps=1`` for every step's), the epoch's end -> ``train_epoch_end``,
``val_end`` and ``fit_epoch_end`` (``eval_*`` metrics are reported as ``val_*``, ``loss`` as
``train_loss``; with ``eval_strategy="epoch"`` the epoch ends at its evaluation). Commands:
stop sets ``control.should_training_stop``, pause holds training at the next step, save sets
``control.should_save`` (the Trainer writes its checkpoint at that step's end), set_lr sets the
optimizer's learning rate and rescales the schedule with it.

Only the main process reports (``state.is_world_process_zero``). Imported only when asked for.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ._run import Run

__all__ = ["TrainbusCallback"]


class TrainbusCallback(TrainerCallback):
    """Reports a Transformers training to trainbus as the job of run ``run_id`` and obeys its
    commands. ``options`` are :class:`~trainbus.sdk.Run`'s."""

    def __init__(self, run_id: str | None = None, **options: Any) -> None:
        self.run_id = run_id
        self.options = options
        self.run: Run | None = None
        self._scheduler: Any = None
        self._loss: float | None = None
        self._train_loss: float | None = None
        self._save_requested = False
        self._by_evaluation = False

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero:
            return
        self._scheduler = kwargs.get("lr_scheduler")
        self._by_evaluation = str(getattr(args.eval_strategy, "value", args.eval_strategy)) == (
            "epoch"
        )
        epochs = math.ceil(args.num_train_epochs) if args.max_steps <= 0 else None
        run = Run(
            self.run_id,
            epochs=epochs,
            optimizer=kwargs.get("optimizer"),
            on_save=self._request_save,
            on_set_lr=self._rescale_schedule,
            from_step=state.global_step or None,
            epoch_checkpoints=False,  # the Trainer's save_strategy keeps its checkpoints
            **self.options,
        )
        self.run = run.start(first_epoch=int(state.epoch or 0))

    def on_epoch_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is not None:
            self.run.begin_epoch(round(state.epoch or 0))

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is not None and self.run.check():  # a pause holds here
            control.should_training_stop = True

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is None:
            return
        self.run.log_batch(self._loss, step=state.global_step)
        if self._save_requested:
            control.should_save = True
            self._save_requested = False
        if self.run.should_stop:
            control.should_training_stop = True

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if logs and "loss" in logs:
            self._loss = self._train_loss = float(logs["loss"])

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is not None and not self._by_evaluation:
            self._end_epoch(control, {})

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if self.run is not None and self._by_evaluation:
            self._end_epoch(control, metrics or {})

    def _end_epoch(self, control: TrainerControl, metrics: dict[str, float]) -> None:
        assert self.run is not None
        values = {
            "val_" + name.removeprefix("eval_"): float(value)
            for name, value in metrics.items()
            if name.startswith("eval_") and isinstance(value, int | float)
        }
        if self._train_loss is not None:
            values["train_loss"] = self._train_loss
        self.run.end_epoch(**values)  # the server's controllers decide on it first
        if self.run.should_stop:
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def _request_save(self, step: int, reason: str) -> None:
        self._save_requested = True

    def _rescale_schedule(self, value: float) -> None:
        if self._scheduler is not None and hasattr(self._scheduler, "base_lrs"):
            self._scheduler.base_lrs = [value for _ in self._scheduler.base_lrs]
