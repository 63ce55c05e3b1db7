"""What every experiment tracker shares: a bounded buffer, a writer thread, retries.

A tracker subscriber turns a job's events into :class:`TrackerRecord` items and appends them
to its own bounded buffer (the handlers never wait); one thread per subscriber hands them to
the tracker (:class:`TrackerBackend`) in order. A call that fails is retried with exponential
back-off, the first failure of an outage and the recovery are published as
``subscriber_error`` events, and what is buffered is written once the tracker answers again.
Past the bound the oldest per-step records are dropped, counted and reported.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, ClassVar, Protocol

import anyio

from trainbus.bus import DeliveryPolicy, Event, EventBus, EventType, Subscriber

__all__ = [
    "TRACKER_EXTRAS",
    "EndState",
    "RecordKind",
    "TrackerBackend",
    "TrackerRecord",
    "TrackerStatistics",
    "TrackerSubscriber",
    "flatten_params",
    "missing_tracker_package",
]

logger = logging.getLogger(__name__)

TRACKER_EXTRAS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "trainbus[tensorboard]"),
    "mlflow": ("mlflow", "trainbus[mlflow]"),
    "wandb": ("wandb", "trainbus[wandb]"),
}
"""Per tracker: the module it needs and the extra that installs it."""


def missing_tracker_package(tracker: str) -> str | None:
    """None when ``tracker``'s package is importable, else what to install (the extra)."""
    module, extra = TRACKER_EXTRAS[tracker]
    return None if importlib.util.find_spec(module) is not None else extra


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": 0.1}}`` -> ``{"optimizer.lr": 0.1}``; lists stay values."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_params(value, f"{name}."))
        else:
            flat[name] = value
    return flat


_DROP_REPORT_INTERVAL = 10.0
"""Seconds between two events about dropped records (the counter is exact)."""


class RecordKind(StrEnum):
    START = "start"
    METRICS = "metrics"
    CHECKPOINT = "checkpoint"
    END = "end"


class EndState(StrEnum):
    """How the job's run ended, as the trackers are told."""

    COMPLETED = "completed"
    STOPPED = "stopped"
    FAILED = "failed"
    INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True)
class TrackerRecord:
    """One thing to tell the tracker.

    ``START``: ``values`` are the flattened hyperparameters, ``step`` the step training
    continues from (0 unless resumed; the tracker drops what it holds past it).
    ``METRICS``: ``values`` are metric name -> float at ``step``. ``CHECKPOINT``: ``values`` is
    the ``checkpoint_saved`` payload. ``END``: ``values["state"]`` is an :class:`EndState`.
    """

    kind: RecordKind
    step: int
    values: Mapping[str, Any]
    index: int = 0


class TrackerBackend(Protocol):
    """The tracker-specific side; every method runs on the subscriber's writer thread."""

    def write(self, records: Sequence[TrackerRecord]) -> None:
        """Hand ``records`` (in order) to the tracker; raise when it could not. A retry
        sends the same records again, so each must be safe to write twice."""

    def close(self) -> None:
        """Release what :meth:`write` opened (files, clients); never raises."""


@dataclass(slots=True)
class TrackerStatistics:
    """Counters of one tracker subscriber."""

    written: int = 0
    """Records the tracker accepted."""
    failures: int = 0
    """Failed write calls (each retried until the record is written or dropped)."""
    dropped: int = 0
    """Records dropped past the buffer bound or left unwritten at the end."""
    gaps: int = 0
    """Events the bus dropped before this subscriber saw them."""
    outages: list[str] = field(default_factory=list)
    """The error of each outage's first failure."""


class TrackerSubscriber(Subscriber):
    """Base of the tracker subscribers: per job, lossy on the bus, never waited for.

    Subclasses set ``tracker`` and implement :meth:`make_backend`. What is logged:
    ``params`` (the flattened job spec) at the start; ``train_loss_step`` and ``lr`` every
    ``log_every_n_steps`` steps from ``train_batch_end``; every numeric metric of
    ``fit_epoch_end`` at its step (with ``epoch``); ``checkpoint_saved``; the end state.

    :param job_id: the job to follow.
    :param bus: where ``subscriber_error`` events go.
    :param params: the job's hyperparameters (nested mappings are flattened with ``.``).
    :param log_every_n_steps: per-step loss and learning rate every N steps (0: never).
    :param max_buffered: records held while the tracker is slow or down; past it the oldest
        per-step records are dropped (and counted).
    :param retry_initial: seconds before the first retry; doubled after each failure ...
    :param retry_max: ... up to this.
    :param close_timeout: at the job's end, how long to keep trying to write what is held.
    :param write_interval: seconds between two writes: what arrives meanwhile goes in one
        call (rather than an HTTP request for each flush of batch events, ten a second).
    """

    tracker: ClassVar[str] = "tracker"
    policy = DeliveryPolicy.DROP_OLDEST
    buffer_size = 8192
    steers_training = False
    types = (
        EventType.TRAIN_START,
        EventType.TRAIN_BATCH_END,
        EventType.FIT_EPOCH_END,
        EventType.CHECKPOINT_SAVED,
        EventType.MODEL_SAVE,
        EventType.TRAIN_END,
        EventType.TEARDOWN,
        EventType.GAP,
    )

    def __init__(
        self,
        *,
        job_id: str,
        bus: EventBus | None,
        params: Mapping[str, Any] | None = None,
        log_every_n_steps: int = 50,
        max_buffered: int = 10_000,
        retry_initial: float = 0.5,
        retry_max: float = 30.0,
        close_timeout: float = 10.0,
        write_interval: float = 1.0,
    ) -> None:
        if max_buffered < 1:
            raise ValueError(f"max_buffered must be >= 1, got {max_buffered}")
        self.job_id: str = job_id
        self.bus = bus
        self.params = flatten_params(params or {})
        self.log_every_n_steps = log_every_n_steps
        self.max_buffered = max_buffered
        self.retry_initial = retry_initial
        self.retry_max = retry_max
        self.close_timeout = close_timeout
        self.write_interval = write_interval
        self.stats = TrackerStatistics()
        self._buffer: deque[TrackerRecord] = deque()
        self._condition = threading.Condition()
        self._next_index = 1
        self._closing = False
        self._closed = threading.Event()
        self._deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._end_state: EndState | None = None
        self._torn_down = False
        self._last_step = 0
        self._backend: TrackerBackend | None = None
        self._drop_reported_at = -_DROP_REPORT_INTERVAL

    @property
    def name(self) -> str:
        return f"{self.tracker}_tracker"

    def make_backend(self) -> TrackerBackend:
        """Build the tracker's backend (on the writer thread: imports happen there)."""
        raise NotImplementedError

    # -- buffer -----------------------------------------------------------------------------

    def _add(self, kind: RecordKind, step: int, values: Mapping[str, Any]) -> None:
        dropped = 0
        with self._condition:
            self._buffer.append(TrackerRecord(kind, step, values, self._next_index))
            self._next_index += 1
            while len(self._buffer) > self.max_buffered:
                self._drop_one()
                dropped += 1
            self._condition.notify_all()
        if dropped:
            with self._condition:
                self.stats.dropped += dropped
                now = time.monotonic()
                due = now - self._drop_reported_at >= _DROP_REPORT_INTERVAL
                if due:
                    self._drop_reported_at = now
            if due:  # one event per interval, not one per dropped record
                self._report_dropped("its buffer was full")

    def _drop_one(self) -> None:
        """Drop the oldest per-step record (the start, checkpoints and end are kept)."""
        for position, record in enumerate(self._buffer):
            if record.kind is RecordKind.METRICS:
                del self._buffer[position]
                return
        self._buffer.popleft()

    def _report_dropped(self, why: str) -> None:
        with self._condition:
            total = self.stats.dropped
        self._report(
            "TrackerRecordsDropped",
            f"{self.tracker}: dropped the oldest per-step records because {why} ({total} so far)",
            dropped_total=total,
        )

    def _report(self, error_type: str, message: str, **extra: Any) -> None:
        logger.warning("job %s: %s", self.job_id, message)
        if self.bus is None:
            return
        data = {
            "subscriber": self.name,
            "tracker": self.tracker,
            "error_type": error_type,
            "message": message,
            "failures": self.stats.failures,
            **extra,
        }
        try:
            self.bus.publish(self.job_id, EventType.SUBSCRIBER_ERROR, data)
        except Exception as error:  # a closed bus: the log line above stays
            logger.debug("subscriber_error not published: %r", error)

    # -- events -----------------------------------------------------------------------------

    async def on_start(self) -> None:
        self._thread = threading.Thread(
            target=self._write_loop, name=f"{self.name} {self.job_id}", daemon=True
        )
        self._thread.start()

    async def on_train_start(self, event: Event) -> None:
        step = int(event.data.get("step", 0))
        # A resumed job replays from its checkpoint's step: the tracker drops what it holds
        # past that step (or overwrites it), so that curves do not double.
        from_step = int(event.data.get("from_step", step)) if event.data.get("resumed") else 0
        self._add(RecordKind.START, from_step, self.params)

    async def on_train_batch_end(self, event: Event) -> None:
        every = self.log_every_n_steps
        step = int(event.data["step"])
        if every and step % every == 0:
            data = event.data
            values = _numbers({"train_loss_step": data.get("loss"), "lr": data.get("lr")})
            if values:
                self._add(RecordKind.METRICS, step, values)

    async def on_fit_epoch_end(self, event: Event) -> None:
        values = _numbers(event.data.get("metrics") or {})
        values["epoch"] = float(event.data.get("epoch", 0))
        self._add(RecordKind.METRICS, int(event.data.get("step", 0)), values)

    async def on_checkpoint_saved(self, event: Event) -> None:
        self._add(RecordKind.CHECKPOINT, int(event.data.get("step", 0)), dict(event.data))

    async def on_model_save(self, event: Event) -> None:
        reason = event.data.get("save_reason") or event.data.get("reason")
        if reason == "failure":
            self._end_state = EndState.FAILED
        elif reason == "stop":
            self._end_state = EndState.STOPPED
        elif reason == "pause":
            self._end_state = EndState.INTERRUPTED

    async def on_train_end(self, event: Event) -> None:
        self._end_state = EndState.COMPLETED
        self._last_step = int(event.data.get("step", 0))

    async def on_teardown(self, event: Event) -> None:
        self._torn_down = True
        self._last_step = int(event.data.get("step", 0))

    async def on_gap(self, event: Event) -> None:
        missed = int(event.data.get("missed", 0) or 0)
        with self._condition:
            self.stats.gaps += missed
        self._report(
            "TrackerEventsMissed",
            f"{self.tracker}: {missed} event(s) dropped on the bus before the tracker saw them",
            missed=missed,
        )

    async def on_stop(self) -> None:
        # The end goes last: the run's final checkpoint_saved may follow teardown (the
        # writer publishes from its own thread), and a tracker run reopened for it would be
        # a second run.
        # teardown without train_end or a save saying why: failed; no teardown: detached
        # mid-run (the server shutting down)
        state = (self._end_state or EndState.FAILED) if self._torn_down else EndState.INTERRUPTED
        self._add(RecordKind.END, self._last_step, {"state": state.value})
        with self._condition:
            self._closing = True
            self._deadline = time.monotonic() + self.close_timeout
            self._condition.notify_all()
        self._closed.set()
        thread = self._thread
        if thread is not None:
            await anyio.to_thread.run_sync(thread.join, self.close_timeout + 5.0)

    # -- writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        delay = self.retry_initial
        failing = False
        left = 0
        try:
            while True:
                with self._condition:
                    while not self._buffer and not self._closing:
                        self._condition.wait()
                    if not self._buffer:
                        return
                    batch = list(self._buffer)
                try:
                    if self._backend is None:
                        self._backend = self.make_backend()
                    self._backend.write(batch)
                except Exception as error:
                    with self._condition:
                        self.stats.failures += 1
                        if not failing:
                            self.stats.outages.append(f"{type(error).__name__}: {error}")
                    if not failing:
                        failing = True
                        self._report(
                            type(error).__name__,
                            f"{self.tracker} is not answering ({error}); buffering up to "
                            f"{self.max_buffered} records and retrying",
                        )
                    if self._closed.is_set():  # the job has ended: try until the deadline
                        remaining = self._deadline - time.monotonic()
                        if remaining <= 0:
                            with self._condition:
                                left = len(self._buffer)
                                self._buffer.clear()
                            break
                        time.sleep(min(delay, remaining))
                    else:  # new records do not cut the back-off short; the job's end does
                        self._closed.wait(delay)
                    delay = min(delay * 2, self.retry_max)
                    continue
                last = batch[-1].index
                with self._condition:
                    while self._buffer and self._buffer[0].index <= last:
                        self._buffer.popleft()
                    self.stats.written += len(batch)
                if failing:
                    failing = False
                    delay = self.retry_initial
                    self._report(
                        "TrackerRecovered",
                        f"{self.tracker} answers again; wrote the {len(batch)} held record(s); "
                        f"{self.stats.dropped} dropped so far",
                        recovered=True,
                        dropped_total=self.stats.dropped,
                    )
                # gather what arrives meanwhile into the next write; the job's end cuts this short
                self._closed.wait(self.write_interval)
            if left:
                with self._condition:
                    self.stats.dropped += left
                self._report_dropped("the tracker did not answer before the job ended")
        finally:
            if self._backend is not None:
                self._backend.close()

    def statistics(self) -> TrackerStatistics:
        with self._condition:
            return TrackerStatistics(
                self.stats.written,
                self.stats.failures,
                self.stats.dropped,
                self.stats.gaps,
                list(self.stats.outages),
            )


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` as floats (booleans and None left out)."""
    return {
        key: float(value)
        for key, value in values.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
