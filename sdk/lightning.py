"""PyTorch Lightning: a ``Callback`` that makes a ``Trainer.fit`` a trainbus job.

::

    from trainbus.sdk.lightning import TrainbusCallback

    trainer = L.Trainer(max_epochs=10, callbacks=[TrainbusCallback("resnet-a")])
    trainer.fit(model, train_loader, val_loader)

Lightning's hooks map onto the built-in vocabulary (``on_train_epoch_start`` ->
``train_epoch_start``, ``on_train_batch_end`` -> the batch events with the step's loss,
``on_train_epoch_end`` -> ``train_epoch_end``/``val_end``/``fit_epoch_end`` with
``trainer.callback_metrics``). Commands: stop sets ``trainer.should_stop`` (the fit ends
after the batch), pause holds the fit after the batch until resume, save calls
``trainer.save_checkpoint``, set_lr sets every parameter group's learning rate of the first
optimizer. Lightning keeps its own checkpoints (``ModelCheckpoint``); to continue a run,
``fit(..., ckpt_path=...)`` with the same run id: the job continues from Lightning's step.

With ``strategy="ddp"`` (Lightning's own processes or ``torchrun``) the callback runs on
every rank: rank 0 (``trainer.is_global_zero``) reports, and every rank applies rank 0's
commands at the same batch boundary, so ``trainer.should_stop`` is set on all ranks at the
same step and a save calls ``trainer.save_checkpoint`` on all of them. Imported only when
asked for: ``import trainbus.sdk`` does not load Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

from ._run import Run

__all__ = ["TrainbusCallback"]


class TrainbusCallback(pl.Callback):
    """Reports a Lightning fit to trainbus as the job of run ``run_id`` and obeys its
    commands. ``options`` are :class:`~trainbus.sdk.Run`'s (``url``, ``token``, ``config``,
    ``early_stop``, ...)."""

    # Lightning calls a callback's hook only where it is callable, and each call costs a few
    # microseconds of dispatch: the per-batch hooks this callback has no use for are None.
    on_train_batch_start = None  # type: ignore[assignment]
    on_before_backward = None  # type: ignore[assignment]
    on_after_backward = None  # type: ignore[assignment]
    on_before_optimizer_step = None  # type: ignore[assignment]
    on_before_zero_grad = None  # type: ignore[assignment]
    on_validation_batch_start = None  # type: ignore[assignment]
    on_validation_batch_end = None  # type: ignore[assignment]

    def __init__(self, run_id: str | None = None, **options: Any) -> None:
        self.run_id = run_id
        self.options = options
        self.run: Run | None = None
        self._trainer: pl.Trainer | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._trainer = trainer
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        epochs = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else None
        run = Run(
            self.run_id,
            epochs=epochs,
            optimizer=optimizer,
            on_save=self._save,
            from_step=trainer.global_step or None,
            epoch_checkpoints=False,  # Lightning's ModelCheckpoint keeps the epochs'
            **self.options,
        )
        self.run = run.start(first_epoch=trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.begin_epoch(trainer.current_epoch)
            if self.run.check():  # a pause holds here
                trainer.should_stop = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if self.run is None:
            return
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        self.run.log_batch(loss, step=trainer.global_step)
        if self.run.check():  # a pause holds here, between this batch and the next
            trainer.should_stop = True

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is None:
            return
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if value.numel() == 1
        }
        self.run.end_epoch(**metrics)  # the server's controllers decide on it first
        if self.run.should_stop:
            trainer.should_stop = True

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self.run is None:
            return
        if isinstance(exception, KeyboardInterrupt):
            self.run.finish("interrupted", reason="interrupted (KeyboardInterrupt)")
        else:
            self.run.finish("failed", error=exception)
        self.run = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def _save(self, step: int, reason: str) -> None:
        trainer = self._trainer
        assert trainer is not None and self.run is not None
        folder = Path(trainer.default_root_dir) / "trainbus-checkpoints" / self.run.run_id
        trainer.save_checkpoint(folder / f"{reason}-step={step}.ckpt")
