"""Reduce the learning rate on a plateau: Keras' ReduceLROnPlateau through ``set_lr``."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from trainbus.bus import (
    ControlChannel,
    ControlError,
    DeliveryPolicy,
    Event,
    EventBus,
    Mode,
    Subscriber,
    improves,
)

from ._trainer import TrainerLike

__all__ = ["LRPlateau", "LRPlateauController"]

logger = logging.getLogger(__name__)


class LRPlateau:
    """Keras' ReduceLROnPlateau rules, pure and synchronous.

    Per epoch (:meth:`update`): during a cooldown the counter goes down and the wait count
    is reset; a value better than the best by more than ``min_delta`` becomes the best and
    resets the wait; otherwise, outside a cooldown, the wait grows, and at ``patience`` the
    learning rate becomes ``max(lr * factor, min_lr)`` (if ``lr`` is above ``min_lr``), a
    cooldown of ``cooldown`` epochs starts and the wait resets. Idempotent per epoch.
    """

    def __init__(
        self,
        *,
        mode: Mode = "min",
        factor: float = 0.1,
        patience: int = 2,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must be between 0 and 1 (exclusive), got {factor}")
        self.mode = mode
        self.factor = factor
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.best: float | None = None
        self.wait = 0
        self.cooldown_counter = 0
        self._last_epoch: int | None = None
        self._last_result: float | None = None

    def _better(self, value: float) -> bool:
        return improves(value, self.best, self.mode, self.min_delta)

    def update(self, epoch: int, value: float, lr: float) -> float | None:
        """Take ``epoch``'s monitored ``value`` and current ``lr``; the new lr, or None."""
        if epoch == self._last_epoch:
            return self._last_result
        self._last_epoch = epoch
        self._last_result = self._decide(float(value), float(lr))
        return self._last_result

    def _decide(self, value: float, lr: float) -> float | None:
        in_cooldown = self.cooldown_counter > 0
        if in_cooldown:
            self.cooldown_counter -= 1
            self.wait = 0
        if self._better(value):
            self.best = value
            self.wait = 0
            return None
        if self.cooldown_counter > 0:
            return None
        self.wait += 1
        if self.wait < self.patience:
            return None
        self.wait = 0
        if not lr > self.min_lr:
            return None
        self.cooldown_counter = self.cooldown
        new_lr = max(lr * self.factor, self.min_lr)
        return new_lr if new_lr < lr and new_lr > 0 else None

    def state_dict(self) -> dict[str, Any]:
        """Best value, wait and cooldown counters."""
        return {"best": self.best, "wait": self.wait, "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        self.best = None if state.get("best") is None else float(state["best"])
        self.wait = int(state.get("wait", 0))
        self.cooldown_counter = int(state.get("cooldown_counter", 0))
        self._last_epoch = self._last_result = None


class LRPlateauController(Subscriber):
    """Lowers the learning rate when the monitored metric stops improving.

    On each ``fit_epoch_end`` event it reads ``event.data["metrics"][monitor]`` and the
    current learning rate ``event.data["metrics"]["lr"]``, applies :class:`LRPlateau`, and
    sends ``channel.set_lr(new_lr, reason, source="lr_plateau")``. It publishes nothing
    itself: the trainer applies the command at the next batch boundary and publishes
    ``lr_changed`` (with ``source="lr_plateau"`` and the reason), so the event says when the
    new rate really took effect. :meth:`bind` saves the controller's state in checkpoints
    (``register_stateful("lr_plateau", ...)``).

    :param job_id: the job to watch.
    :param channel: the job's control channel.
    :param bus: accepted so that every per-job subscriber is built alike; unused (the
        trainer publishes ``lr_changed``).
    :param monitor: the metric to watch (``val_loss``).
    :param mode: ``min`` or ``max``.
    :param factor: the learning rate is multiplied by this (0 < factor < 1).
    :param patience: epochs without improvement before lowering the rate.
    :param min_delta: the least change that counts as an improvement.
    :param cooldown: epochs to wait after a reduction before counting again.
    :param min_lr: the learning rate never goes below this.
    """

    policy = DeliveryPolicy.LOSSLESS

    def __init__(
        self,
        *,
        job_id: str,
        channel: ControlChannel,
        bus: EventBus | None = None,
        monitor: str = "val_loss",
        mode: Mode = "min",
        factor: float = 0.1,
        patience: int = 2,
        min_delta: float = 1e-4,
        cooldown: int = 0,
        min_lr: float = 0.0,
    ) -> None:
        self.job_id = job_id
        self._job = job_id
        self.channel = channel
        self.bus = bus
        self.monitor = monitor
        self.rules = LRPlateau(
            mode=mode,
            factor=factor,
            patience=patience,
            min_delta=min_delta,
            cooldown=cooldown,
            min_lr=min_lr,
        )
        self._lock = threading.Lock()

    async def on_fit_epoch_end(self, event: Event) -> None:
        metrics: Mapping[str, Any] = event.data.get("metrics") or {}
        value, lr = metrics.get(self.monitor), metrics.get("lr")
        if not isinstance(value, int | float) or not isinstance(lr, int | float):
            return
        epoch = int(event.data.get("epoch", 0))
        with self._lock:
            old_best = self.rules.best
            new_lr = self.rules.update(epoch, value, lr)
        if new_lr is None:
            return
        reason = (
            f"{self.monitor} did not improve on {old_best} for {self.rules.patience} epochs; "
            f"lr {lr:.6g} -> {new_lr:.6g}"
        )
        try:
            self.channel.set_lr(new_lr, reason, source="lr_plateau")
        except ControlError as error:
            logger.info("lr plateau of job %s: set_lr not sent: %s", self._job, error)

    def bind(self, trainer: TrainerLike) -> None:
        """Save this controller's state in the trainer's checkpoints."""
        trainer.register_stateful("lr_plateau", self)

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self.rules.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self.rules.load_state_dict(state)
