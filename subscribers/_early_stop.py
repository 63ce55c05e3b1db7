"""Early stopping: Lightning's and Keras' rules, acting through the job's control channel."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import torch

from trainbus.bus import (
    ControlChannel,
    ControlError,
    DeliveryPolicy,
    Event,
    EventBus,
    EventType,
    Mode,
    Subscriber,
    improves,
)

from ._snapshot import snapshot
from ._trainer import TrainerLike

__all__ = ["EarlyStopController", "EarlyStopDecision", "EarlyStopReason", "EarlyStopping"]

logger = logging.getLogger(__name__)


class EarlyStopReason(StrEnum):
    """Why early stopping ended a job (Lightning's reasons)."""

    PATIENCE_EXHAUSTED = "patience_exhausted"
    STOPPING_THRESHOLD = "stopping_threshold"
    DIVERGENCE_THRESHOLD = "divergence_threshold"
    NON_FINITE = "non_finite"


@dataclass(frozen=True, slots=True)
class EarlyStopDecision:
    """The outcome of one validation check: stop (and why), and whether it improved."""

    epoch: int
    value: float
    improved: bool
    stop: bool
    reason: EarlyStopReason | None
    message: str


class EarlyStopping:
    """The decision rules, pure and synchronous (no bus, no trainer).

    Per validation check (:meth:`update`), in Lightning's order: a non-finite value stops
    (``check_finite``); reaching ``stopping_threshold`` stops; crossing
    ``divergence_threshold`` stops; otherwise the value improves when it beats the best by
    more than ``min_delta`` and the wait count resets, but only if it also beats
    ``baseline`` (Keras); after ``patience`` checks without that, it stops. Checks before
    epoch ``start_from_epoch`` are ignored (Keras). :meth:`update` is idempotent per epoch,
    so the inline callback and the bus handler may both ask about the same epoch.
    """

    def __init__(
        self,
        *,
        mode: Mode = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        baseline: float | None = None,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        start_from_epoch: int = 0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 0:
            raise ValueError(f"patience must be >= 0, got {patience}")
        self.mode = mode
        self.patience = patience
        self.min_delta = abs(min_delta)
        self.baseline = baseline
        self.stopping_threshold = stopping_threshold
        self.divergence_threshold = divergence_threshold
        self.check_finite = check_finite
        self.start_from_epoch = start_from_epoch
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self.stopped: EarlyStopDecision | None = None
        self._last: EarlyStopDecision | None = None

    def _better(self, value: float, reference: float | None, delta: float = 0.0) -> bool:
        return improves(value, reference, self.mode, delta)

    def update(self, epoch: int, value: float) -> EarlyStopDecision | None:
        """Take the monitored ``value`` of ``epoch``; None when the check is ignored."""
        if self._last is not None and self._last.epoch == epoch:
            return self._last
        if self.stopped is not None or epoch < self.start_from_epoch:
            return None
        decision = self._decide(epoch, float(value))
        self._last = decision
        if decision.stop:
            self.stopped = decision
        return decision

    def _decide(self, epoch: int, value: float) -> EarlyStopDecision:
        def done(
            reason: EarlyStopReason | None, message: str, improved: bool = False
        ) -> EarlyStopDecision:
            return EarlyStopDecision(epoch, value, improved, reason is not None, reason, message)

        if self.check_finite and not math.isfinite(value):
            return done(EarlyStopReason.NON_FINITE, f"monitored value is {value}; stopping")
        if self.stopping_threshold is not None and self._better(value, self.stopping_threshold):
            return done(
                EarlyStopReason.STOPPING_THRESHOLD,
                f"{value:.6g} reached the stopping threshold {self.stopping_threshold}",
            )
        if self.divergence_threshold is not None and self._better(self.divergence_threshold, value):
            return done(
                EarlyStopReason.DIVERGENCE_THRESHOLD,
                f"{value:.6g} is past the divergence threshold {self.divergence_threshold}",
            )
        improved = self._better(value, self.best, self.min_delta)
        if improved:
            self.best, self.best_epoch = value, epoch
            if self.baseline is None or self._better(value, self.baseline):
                self.wait = 0
                return done(None, f"improved to {value:.6g}", improved=True)
        self.wait += 1
        if self.wait >= self.patience:
            return done(
                EarlyStopReason.PATIENCE_EXHAUSTED,
                f"no improvement in {self.wait} checks; best {self.best} at epoch "
                f"{self.best_epoch}",
                improved,
            )
        return done(None, f"no improvement for {self.wait} of {self.patience} checks", improved)

    def state_dict(self) -> dict[str, Any]:
        """Best value and epoch, wait count, the last checked epoch and a stop, if any."""
        stopped = self.stopped
        return {
            "best": self.best,
            "best_epoch": self.best_epoch,
            "wait": self.wait,
            "last_epoch": None if self._last is None else self._last.epoch,
            "stopped_epoch": None if stopped is None else stopped.epoch,
            # plain str: a checkpoint must load with torch.load(weights_only=True)
            "stop_reason": None
            if stopped is None or stopped.reason is None
            else str(stopped.reason.value),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (on resume)."""
        self.best = None if state.get("best") is None else float(state["best"])
        self.best_epoch = None if state.get("best_epoch") is None else int(state["best_epoch"])
        self.wait = int(state.get("wait", 0))
        # A resumed run checks again (even after a stop): the wait count carries over, so
        # patience is not reset, and the next check decides afresh.
        self._last = None
        self.stopped = None


class EarlyStopController(Subscriber):
    """Stops a job when its monitored metric stops improving (Lightning + Keras).

    On each ``fit_epoch_end`` event it reads ``event.data["metrics"][monitor]`` (and
    ``data["epoch"]``), applies :class:`EarlyStopping`, and when it decides to stop sends
    ``channel.stop(reason, source="early_stop")`` (the job then ends ``completed`` with that
    ``stop_reason``) and publishes ``early_stop`` with ``reason`` (an
    :class:`EarlyStopReason`), ``message``, ``monitor``, ``value``, ``best``,
    ``best_epoch``, ``epoch`` and ``wait``.

    :meth:`bind` registers the controller's state with the trainer
    (``register_stateful("early_stop", ...)``) so that best value and wait count are saved in
    checkpoints and restored on resume; with ``restore_best`` it also keeps a CPU copy of the
    model's weights whenever the metric improves (an inline ``on_fit_epoch_end`` callback)
    and loads them into ``trainer.model`` at ``on_train_end``, which the trainer runs before
    its final save: the job's last checkpoint holds the best weights, and its manifest says so
    (``weights``: source, epoch, monitor, value). That copy is part of the saved state, so it
    survives a resume.

    :param job_id: the job to watch.
    :param channel: the job's control channel.
    :param bus: where ``early_stop`` is published.
    :param monitor: the metric to watch (``val_loss``).
    :param mode: ``min`` or ``max``.
    :param patience: validation checks without improvement before stopping.
    :param min_delta: the least change that counts as an improvement.
    :param baseline: a value to beat; checks that improve but do not beat it still count
        towards ``patience``.
    :param stopping_threshold: stop as soon as the metric is better than this.
    :param divergence_threshold: stop as soon as the metric is worse than this.
    :param check_finite: stop when the metric is NaN or infinite.
    :param start_from_epoch: ignore checks of earlier epochs (0-based).
    :param restore_best: end the job with the weights of the best epoch.
    """

    policy = DeliveryPolicy.LOSSLESS

    def __init__(
        self,
        *,
        job_id: str,
        channel: ControlChannel,
        bus: EventBus | None,
        monitor: str = "val_loss",
        mode: Mode = "min",
        patience: int = 3,
        min_delta: float = 0.0,
        baseline: float | None = None,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_finite: bool = True,
        start_from_epoch: int = 0,
        restore_best: bool = False,
    ) -> None:
        self.job_id = job_id
        self._job = job_id
        self.channel = channel
        self.bus = bus
        self.monitor = monitor
        self.restore_best = restore_best
        self.rules = EarlyStopping(
            mode=mode,
            patience=patience,
            min_delta=min_delta,
            baseline=baseline,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_finite=check_finite,
            start_from_epoch=start_from_epoch,
        )
        self._lock = threading.Lock()
        self._best_weights: dict[str, torch.Tensor] | None = None
        self._best_weights_epoch: int | None = None
        self._acted_on: int | None = None
        self._warned_missing = False

    def check(self, epoch: int, metrics: Mapping[str, Any]) -> EarlyStopDecision | None:
        """Apply the rules to one epoch's metrics (thread-safe; idempotent per epoch)."""
        value = metrics.get(self.monitor)
        if not isinstance(value, int | float) or isinstance(value, bool):
            if not self._warned_missing:
                self._warned_missing = True
                logger.warning(
                    "early stop of job %s: metric %r not in %s",
                    self._job,
                    self.monitor,
                    sorted(metrics),
                )
            return None
        with self._lock:
            return self.rules.update(epoch, float(value))

    # -- bus side ---------------------------------------------------------------------------

    async def on_fit_epoch_end(self, event: Event) -> None:
        metrics = event.data.get("metrics") or {}
        epoch = int(event.data.get("epoch", 0))
        decision = self.check(epoch, metrics)
        if decision is None or not decision.stop or self._acted_on is not None:
            return
        self._acted_on = epoch
        assert decision.reason is not None
        try:
            self.channel.stop(decision.reason.value, source="early_stop")
        except ControlError as error:
            logger.info("early stop of job %s not sent: %s", self._job, error)
        if self.bus is not None:
            await self.bus.publish_async(
                self._job,
                EventType.EARLY_STOP,
                {
                    "reason": decision.reason.value,
                    "message": decision.message,
                    "monitor": self.monitor,
                    "value": decision.value if math.isfinite(decision.value) else None,
                    "best": self.rules.best,
                    "best_epoch": self.rules.best_epoch,
                    "epoch": epoch,
                    "wait": self.rules.wait,
                },
            )

    # -- trainer side -----------------------------------------------------------------------

    def bind(self, trainer: TrainerLike) -> None:
        """Save this controller's state in the trainer's checkpoints; with ``restore_best``,
        keep and restore the best weights through inline callbacks."""
        trainer.register_stateful("early_stop", self)
        if self.restore_best:
            trainer.add_callback("on_fit_epoch_end", self._keep_best_weights)
            trainer.add_callback("on_train_end", self._restore_best_weights)

    def _keep_best_weights(self, trainer: TrainerLike) -> None:
        decision = self.check(trainer.epoch, trainer.metrics)
        if decision is not None and decision.improved:
            with self._lock:
                self._best_weights = snapshot(trainer.model.state_dict(), self._best_weights)
                self._best_weights_epoch = trainer.epoch

    def _restore_best_weights(self, trainer: TrainerLike) -> None:
        with self._lock:
            weights = self._best_weights
        if weights is not None:
            trainer.model.load_state_dict(weights)
            trainer.weights_origin = {
                "source": "early_stop.restore_best",
                "epoch": self._best_weights_epoch,
                "monitor": self.monitor,
                "value": self.rules.best,
            }
            logger.info(
                "job %s: restored the weights of epoch %s", self._job, self._best_weights_epoch
            )

    def state_dict(self) -> dict[str, Any]:
        """The rules' state, and the best weights when ``restore_best`` is on."""
        with self._lock:
            state = self.rules.state_dict()
            if self.restore_best and self._best_weights is not None:
                state["best_weights"] = self._best_weights
                state["best_weights_epoch"] = self._best_weights_epoch
            return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        with self._lock:
            self.rules.load_state_dict(state)
            self._acted_on = None  # a resumed run is a new run: it may be stopped again
            weights = state.get("best_weights")
            self._best_weights = None if weights is None else dict(weights)
            self._best_weights_epoch = state.get("best_weights_epoch")
