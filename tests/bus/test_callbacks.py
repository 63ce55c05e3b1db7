from __future__ import annotations

from typing import Any

import pytest

from trainbus.bus import CallbackRegistry, EventType, UnknownEventName


def test_callbacks_run_inline_in_registration_order() -> None:
    registry = CallbackRegistry()
    calls: list[tuple[str, Any]] = []
    registry.add_callback("on_train_epoch_end", lambda trainer: calls.append(("a", trainer)))
    registry.add_callback("train_epoch_end", lambda trainer: calls.append(("b", trainer)))
    registry.run_callbacks(EventType.TRAIN_EPOCH_END, "the trainer")
    registry.run_callbacks(EventType.TRAIN_START, "nobody listens")
    assert calls == [("a", "the trainer"), ("b", "the trainer")]
    assert len(registry.get_callbacks("on_train_epoch_end")) == 2


def test_a_typo_is_rejected_with_the_valid_names() -> None:
    registry = CallbackRegistry()
    with pytest.raises(UnknownEventName) as caught:
        registry.add_callback("on_train_epoch_ned", print)
    assert "on_train_epoch_end" in str(caught.value)
    with pytest.raises(UnknownEventName):  # a service event is not a trainer callback
        registry.add_callback("on_job_queued", print)
    with pytest.raises(TypeError):
        registry.add_callback("on_train_end", "not callable")  # type: ignore[arg-type]


def test_a_raising_callback_is_reported_and_the_rest_still_run() -> None:
    reports: list[tuple[EventType, str]] = []
    registry = CallbackRegistry(on_error=lambda t, cb, err: reports.append((t, str(err))))
    ran: list[str] = []

    def broken(trainer: object) -> None:
        raise ValueError("bad callback")

    registry.add_callback("on_fit_epoch_end", broken)
    registry.add_callback("on_fit_epoch_end", lambda trainer: ran.append("after"))
    registry.run_callbacks(EventType.FIT_EPOCH_END, None)
    assert reports == [(EventType.FIT_EPOCH_END, "bad callback")]
    assert ran == ["after"]
    registry.remove_callback("on_fit_epoch_end", broken)
    registry.run_callbacks(EventType.FIT_EPOCH_END, None)
    assert len(reports) == 1


def test_version_tells_a_hot_loop_when_registrations_changed() -> None:
    registry = CallbackRegistry()
    batch_types = (EventType.OPTIMIZER_STEP, EventType.TRAIN_BATCH_END)
    before = registry.version
    assert not registry.has_callbacks(batch_types)

    def callback(trainer: Any) -> None:
        pass

    registry.add_callback("on_train_batch_end", callback)
    assert registry.version != before
    assert registry.has_callbacks(batch_types)
    assert not registry.has_callbacks([EventType.TRAIN_START])
    added = registry.version
    registry.remove_callback("on_train_batch_end", callback)
    assert registry.version != added
    assert not registry.has_callbacks(batch_types)
    removed = registry.version
    registry.remove_callback("on_train_batch_end", callback)  # absent: nothing changed
    assert registry.version == removed
