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
``train_loss``; with ``eval_strategy="epoch"`` the epoch ends at its evaluation). Commands
take effect at a step's end (``on_step_end``, after the optimizer step), and the
acknowledgement names that step: stop sets ``control.should_training_stop`` (the training ends
after that step), pause holds training there until resume, save sets ``control.should_save``
(the Trainer writes ``checkpoint-<step>`` before the next step; a pause's checkpoint, at the
paused step, once training continues), set_lr sets the optimizer's learning rate and rescales
the schedule with it.

Under ``torchrun`` (the Trainer's DDP, ``torch.distributed`` initialised with more than one
process) the callback runs on every rank: rank 0 (``state.is_world_process_zero``) reports,
the other ranks publish nothing, and every rank applies rank 0's commands at the same step
(``sdk/_agreement.py``: one broadcast at each step's end). A DDP step is an all-reduce every
rank takes part in, so ``control.should_training_stop`` is set on every rank at the same
step; a pause holds every rank there, a save sets ``control.should_save`` on every rank (the
Trainer's checkpoint can take collectives: a sharded model's state, a barrier), a set_lr
reaches every rank's optimizer, and the early-stop and LR-plateau decisions the server takes
on an epoch are agreed at the epoch's end, before the next one starts. A single process
exchanges nothing. Imported only when asked for.
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

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.run is None:
            return
        self.run.log_batch(self._loss, step=state.global_step)
        # the step's one boundary: every rank takes rank 0's commands here (a pause holds here)
        if self.run.check():
            control.should_training_stop = True
        if self._save_requested:
            control.should_save = True  # the Trainer writes it before the next step
            self._save_requested = False

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
        # the server's controllers decide on it first; every rank takes their decision here
        self.run.end_epoch(**values)
        if self.run.should_stop:
            control.should_training_stop = True
        if self._save_requested:
            control.should_save = True
            self._save_requested = False

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
