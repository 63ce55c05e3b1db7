"""The event record and the event vocabulary (Ultralytics' callback names without ``on_``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import StrEnum
from typing import Any, NamedTuple

from ._errors import UnknownEventName

__all__ = [
    "BATCH_EVENT_TYPES",
    "CALLBACK_EVENT_TYPES",
    "Event",
    "EventType",
    "event_type_for",
]


class EventType(StrEnum):
    """Every event type trainbus publishes."""

    # trainer (Ultralytics callbacks)
    PRETRAIN_ROUTINE_START = "pretrain_routine_start"
    PRETRAIN_ROUTINE_END = "pretrain_routine_end"
    TRAIN_START = "train_start"
    TRAIN_EPOCH_START = "train_epoch_start"
    TRAIN_BATCH_START = "train_batch_start"
    OPTIMIZER_STEP = "optimizer_step"
    BEFORE_ZERO_GRAD = "before_zero_grad"
    TRAIN_BATCH_END = "train_batch_end"
    TRAIN_EPOCH_END = "train_epoch_end"
    FIT_EPOCH_END = "fit_epoch_end"
    MODEL_SAVE = "model_save"
    TRAIN_END = "train_end"
    PARAMS_UPDATE = "params_update"
    TEARDOWN = "teardown"
    # validator (Ultralytics callbacks)
    VAL_START = "val_start"
    VAL_BATCH_START = "val_batch_start"
    VAL_BATCH_END = "val_batch_end"
    VAL_END = "val_end"
    # service
    JOB_QUEUED = "job_queued"
    JOB_STARTED = "job_started"
    JOB_PAUSED = "job_paused"
    JOB_RESUMED = "job_resumed"
    JOB_STOPPING = "job_stopping"
    JOB_COMPLETED = "job_completed"
    JOB_STOPPED = "job_stopped"
    JOB_FAILED = "job_failed"
    JOB_INTERRUPTED = "job_interrupted"
    JOB_STALLED = "job_stalled"
    CHECKPOINT_SAVED = "checkpoint_saved"
    EARLY_STOP = "early_stop"
    LR_CHANGED = "lr_changed"
    RESOURCE_SAMPLE = "resource_sample"
    LOG = "log"
    SUBSCRIBER_ERROR = "subscriber_error"
    GAP = "gap"

    @property
    def callback_name(self) -> str | None:
        """The Ultralytics callback name (``on_<type>``) for trainer and validator events."""
        return f"on_{self.value}" if self in CALLBACK_EVENT_TYPES else None


CALLBACK_EVENT_TYPES: frozenset[EventType] = frozenset(
    EventType(name)
    for name in [
        "pretrain_routine_start",
        "pretrain_routine_end",
        "train_start",
        "train_epoch_start",
        "train_batch_start",
        "optimizer_step",
        "before_zero_grad",
        "train_batch_end",
        "train_epoch_end",
        "fit_epoch_end",
        "model_save",
        "train_end",
        "params_update",
        "teardown",
        "val_start",
        "val_batch_start",
        "val_batch_end",
        "val_end",
    ]
)
"""Event types that correspond to an Ultralytics callback (``on_<type>``)."""

BATCH_EVENT_TYPES: frozenset[EventType] = frozenset(
    {
        EventType.TRAIN_BATCH_START,
        EventType.OPTIMIZER_STEP,
        EventType.BEFORE_ZERO_GRAD,
        EventType.TRAIN_BATCH_END,
        EventType.VAL_BATCH_START,
        EventType.VAL_BATCH_END,
    }
)
"""High-rate, per-batch event types (thinned by ``batch_event_every`` and store retention)."""

def event_type_for(name: str | EventType) -> EventType:
    """Return the event type for ``name``: an event type or an Ultralytics callback name.

    ``"on_train_epoch_end"`` and ``"train_epoch_end"`` both give ``EventType.TRAIN_EPOCH_END``.

    :raises UnknownEventName: if ``name`` is neither; the message lists the valid names.
    """
    if isinstance(name, EventType):
        return name
    found = _BY_NAME.get(name) if isinstance(name, str) else None
    if found is None:
        raise UnknownEventName(name, sorted(t.value for t in EventType))
    return found


# a dict, not EventType(value): the server looks up every event a worker sends
_BY_NAME: dict[str, EventType] = {
    **{f"on_{event_type.value}": event_type for event_type in EventType},
    **{event_type.value: event_type for event_type in EventType},
}


def event_types(names: Iterable[str | EventType] | None) -> frozenset[EventType] | None:
    """Normalise an optional collection of names into a set of event types."""
    if names is None:
        return None
    if isinstance(names, str):
        names = [names]
    return frozenset(event_type_for(name) for name in names)


class Event(NamedTuple):
    """One immutable event of one job.

    ``seq`` is per job, starts at 1 and is gap-free and strictly increasing; ``time`` is
    wall-clock seconds; ``data`` is a JSON-serialisable mapping that nobody mutates after
    publishing.

    A named tuple rather than a frozen slots dataclass: it is just as immutable and has no
    ``__dict__``, and on the publish path it is built in ~190 ns instead of ~920 ns (a frozen
    dataclass sets each field through ``object.__setattr__``), which is most of the bus's
    per-event budget.
    """

    job_id: str
    seq: int
    type: EventType
    time: float
    data: Mapping[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The event as the JSON object the API sends."""
        return {
            "job_id": self.job_id,
            "seq": self.seq,
            "type": self.type.value,
            "time": self.time,
            "data": dict(self.data),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Event:
        """Rebuild an event from :meth:`to_dict` output."""
        return cls(
            job_id=str(raw["job_id"]),
            seq=int(raw["seq"]),
            type=EventType(raw["type"]),
            time=float(raw["time"]),
            data=dict(raw.get("data") or {}),
        )
