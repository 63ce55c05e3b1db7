"""The progress view of ``trainbus watch`` follows a job's events to its end."""

from __future__ import annotations

import io

from rich.console import Console

from trainbus.api._watch import ProgressView, format_metrics


def _event(seq: int, type: str, **data: object) -> dict[str, object]:
    return {"job_id": "j1", "seq": seq, "type": type, "time": 0.0, "data": data}


def test_follows_epochs_batches_and_the_end() -> None:
    out = io.StringIO()
    events = [
        _event(1, "job_started"),
        _event(2, "train_start", epochs=2, batches_per_epoch=2),
        _event(3, "train_epoch_start", epoch=0),
        _event(4, "train_batch_end", batch=0, loss=0.9),
        _event(5, "train_batch_end", batch=1, loss=0.7),
        _event(6, "fit_epoch_end", epoch=0, metrics={"train_loss": 0.8, "val_loss": 0.6}),
        _event(7, "job_paused", reason="api"),
        _event(8, "gap", from_seq=8, to_seq=9, missed=2),
        _event(10, "job_completed"),
        _event(11, "teardown"),
    ]
    with ProgressView("j1", console=Console(file=out, width=120, force_terminal=False)) as view:
        state = view.follow(events)
        epochs, batches = view.progress.tasks
        assert epochs.total == 2 and epochs.completed == 2
        assert batches.total == 2 and batches.completed == 2
        assert "val_loss=0.6" in view.val
    assert state == "completed"
    assert view.last_seq == 10
    text = out.getvalue()
    assert "job_paused" in text and "missed events 8..9" in text and "completed" in text


def test_format_metrics_skips_non_numbers() -> None:
    assert format_metrics({"a": 0.123456, "b": "x", "c": True, "d": 2}) == "a=0.1235 d=2"


def test_a_pause_says_why_and_checkpoints_get_no_line() -> None:
    out = io.StringIO()
    events = [
        _event(1, "job_paused", command="pause", source="api", reason="", issued_at=1.797e9),
        _event(2, "checkpoint_saved", name="epoch-0001-step-00000045"),
        _event(3, "job_resumed", command="resume", source="api", reason="", issued_at=1.797e9),
        _event(4, "job_stopped", reason="early_stop"),
    ]
    with ProgressView("j1", console=Console(file=out, width=120, force_terminal=False)) as view:
        assert view.follow(events) == "stopped"
    text = out.getvalue()
    assert "job_paused (api)" in text and "job_resumed (api)" in text
    assert "issued_at" not in text and "e+09" not in text
    assert "checkpoint" not in text
