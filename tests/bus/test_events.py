from __future__ import annotations

import dataclasses

import pytest

from trainbus.bus import CALLBACK_EVENT_TYPES, Event, EventType, UnknownEventName, event_type_for


def test_event_is_immutable_and_round_trips_through_json_dict() -> None:
    event = Event("job", 3, EventType.TRAIN_EPOCH_END, 12.5, {"epoch": 1})
    with pytest.raises(AttributeError):
        event.seq = 4  # type: ignore[misc]
    assert not hasattr(event, "__dict__")
    assert Event.from_dict(event.to_dict()) == event
    assert event.to_dict() == {
        "job_id": "job",
        "seq": 3,
        "type": "train_epoch_end",
        "time": 12.5,
        "data": {"epoch": 1},
    }


def test_callback_names_map_to_event_types() -> None:
    assert event_type_for("on_train_epoch_end") is EventType.TRAIN_EPOCH_END
    assert event_type_for("fit_epoch_end") is EventType.FIT_EPOCH_END
    assert EventType.VAL_BATCH_END.callback_name == "on_val_batch_end"
    assert EventType.JOB_QUEUED.callback_name is None
    assert len(CALLBACK_EVENT_TYPES) == 18


def test_unknown_name_lists_the_valid_ones() -> None:
    with pytest.raises(UnknownEventName) as caught:
        event_type_for("on_train_epoch_ends")
    message = str(caught.value)
    assert "on_train_epoch_ends" in message
    assert "train_epoch_end" in message and "fit_epoch_end" in message


def test_every_design_vocabulary_name_exists() -> None:
    vocabulary = [
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
        "job_queued",
        "job_started",
        "job_paused",
        "job_resumed",
        "job_stopping",
        "job_completed",
        "job_stopped",
        "job_failed",
        "job_interrupted",
        "job_stalled",
        "checkpoint_saved",
        "early_stop",
        "lr_changed",
        "resource_sample",
        "log",
        "subscriber_error",
        "gap",
    ]
    assert sorted(vocabulary) == sorted(t.value for t in EventType)
    assert not dataclasses.is_dataclass(Event)  # a named tuple: see Event's docstring
