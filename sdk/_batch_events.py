"""Batch-level events, buffered on the training thread and published in bulk.

A training step of a small model takes well under a millisecond, and building and publishing
its four batch events one call at a time cost that step ~5% (bench/overhead.py, tiny
workload). The trainer therefore records each batch as one plain tuple while it trains and
turns the records into events in one ``publish_many`` call when a record arrives
``flush_seconds`` or more after the last such call (so a slow step's events go out at once,
and fast steps' in bulk about every ``flush_seconds``), and before the trainer publishes
anything else, so that a job's events keep the order in which they happened. Each event keeps
the time at which it happened.

``flush_seconds`` is 0.1 s, tqdm's refresh interval: a person watching a stream sees no
difference, while each flush wakes every subscriber on the event loop, whose work holds the
GIL the training thread needs. At 0.02 s the loop spent 22-27 ms of CPU on four lossless
subscribers during a 0.95 s tiny run and the run was 4.4% slower than a bare loop; at 0.1 s,
8-10 ms and 1.6% (bench/overhead.py, tiny workload, 50,000 samples, 4 epochs).

``max_records`` (256 batches: at most 1,024 events at once) bounds a flush. The server's
WebSocket fan-out hands a client that has taken everything a whole flush, however large
(``api/_hub.py``); its per-client bound applies to what a client leaves behind.
"""

from __future__ import annotations

from time import time as _now
from typing import Any

from trainbus.bus import EventBus, EventType

__all__ = ["BatchEventBuffer"]

TRAIN_BATCH_START = EventType.TRAIN_BATCH_START
OPTIMIZER_STEP = EventType.OPTIMIZER_STEP
BEFORE_ZERO_GRAD = EventType.BEFORE_ZERO_GRAD
TRAIN_BATCH_END = EventType.TRAIN_BATCH_END
VAL_BATCH_START = EventType.VAL_BATCH_START
VAL_BATCH_END = EventType.VAL_BATCH_END

_TRAIN = 0
_VAL = 1


class BatchEventBuffer:
    """Collects one job's batch records; :meth:`flush` publishes them as events.

    Used from the training thread only. A batch's events reach the bus within
    ``flush_seconds`` of the batch's end, or when the next batch ends if that takes longer
    (the bus's wake-up coalescing adds up to its ``max_wake_interval`` for subscribers).
    """

    __slots__ = ("_bus", "_flushed", "_job_id", "_records", "flush_seconds", "max_records")

    def __init__(
        self, bus: EventBus, job_id: str, *, flush_seconds: float = 0.1, max_records: int = 256
    ) -> None:
        self._bus = bus
        self._job_id = job_id
        self._records: list[tuple[Any, ...]] = []
        self._flushed = 0.0  # when flush last published
        self.flush_seconds = flush_seconds
        self.max_records = max_records

    def __len__(self) -> int:
        return len(self._records)

    def train_batch(
        self,
        started: float,
        epoch: int,
        batch: int,
        step: int,
        loss: float,
        lr: float,
        batch_size: int,
    ) -> None:
        """Record a finished training batch (``step`` counts its optimizer step); publishes
        ``train_batch_start``, ``optimizer_step``, ``before_zero_grad``, ``train_batch_end``."""
        now = _now()
        self._add((_TRAIN, started, now, epoch, batch, step, loss, lr, batch_size), now)

    def val_batch(self, started: float, epoch: int, batch: int, loss: float) -> None:
        """Record a finished validation batch; publishes ``val_batch_start``, ``val_batch_end``."""
        now = _now()
        self._add((_VAL, started, now, epoch, batch, 0, loss, 0.0, 0), now)

    def _add(self, record: tuple[Any, ...], now: float) -> None:
        records = self._records
        records.append(record)
        if now - self._flushed >= self.flush_seconds or len(records) >= self.max_records:
            self.flush()

    def flush(self) -> None:
        """Publish what was recorded, in order."""
        records = self._records
        if not records:
            return
        self._records = []
        self._flushed = _now()
        items: list[tuple[EventType, dict[str, Any], float]] = []
        add = items.append
        for kind, started, ended, epoch, batch, step, loss, lr, batch_size in records:
            if kind == _TRAIN:
                # optimizer_step and before_zero_grad carry the same payload; events are
                # immutable once published, so they share one dict
                stepped = {"epoch": epoch, "step": step}
                starting = {"epoch": epoch, "batch": batch, "step": step - 1}
                add((TRAIN_BATCH_START, starting, started))
                add((OPTIMIZER_STEP, stepped, ended))
                add((BEFORE_ZERO_GRAD, stepped, ended))
                add(
                    (
                        TRAIN_BATCH_END,
                        {
                            "epoch": epoch,
                            "batch": batch,
                            "step": step,
                            "loss": loss,
                            "lr": lr,
                            "batch_size": batch_size,
                        },
                        ended,
                    )
                )
            else:
                add((VAL_BATCH_START, {"epoch": epoch, "batch": batch}, started))
                add((VAL_BATCH_END, {"epoch": epoch, "batch": batch, "loss": loss}, ended))
        self._bus.publish_many(self._job_id, items)
