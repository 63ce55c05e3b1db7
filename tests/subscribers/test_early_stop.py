"""Early stopping: the rules against a table of metric sequences, resume, bus and trainer."""

from __future__ import annotations

import json
import math
from typing import Any

import anyio
import pytest
import torch

from trainbus.bus import CommandKind, ControlChannel, EventBus, EventType
from trainbus.subscribers import EarlyStopController, EarlyStopping, EarlyStopReason

from .toy import ToyTrainer

NAN = math.nan
P = EarlyStopReason.PATIENCE_EXHAUSTED

# (parameters, monitored values per epoch, (epoch of the stop, reason) or None)
TABLE: list[tuple[dict[str, Any], list[float], tuple[int, EarlyStopReason] | None]] = [
    ({"patience": 2}, [1.0, 0.9, 0.95, 0.91, 0.5], (3, P)),
    ({"patience": 2}, [1.0, 0.9, 0.95, 0.8, 0.85, 0.7], None),
    ({"patience": 2, "min_delta": 0.1}, [1.0, 0.95, 0.85, 0.8], None),
    ({"patience": 2, "min_delta": 0.1}, [1.0, 0.95, 0.85, 0.8, 0.79], (4, P)),
    ({"patience": 1, "mode": "max"}, [0.5, 0.6, 0.6], (2, P)),
    ({"patience": 0}, [1.0, 0.9, 0.9], (2, P)),
    ({"stopping_threshold": 0.1}, [0.5, 0.2, 0.05, 0.01], (2, EarlyStopReason.STOPPING_THRESHOLD)),
    (
        {"stopping_threshold": 0.9, "mode": "max"},
        [0.5, 0.95],
        (1, EarlyStopReason.STOPPING_THRESHOLD),
    ),
    ({"divergence_threshold": 5.0}, [1.0, 6.0], (1, EarlyStopReason.DIVERGENCE_THRESHOLD)),
    ({"patience": 5}, [1.0, NAN], (1, EarlyStopReason.NON_FINITE)),
    ({"patience": 5}, [1.0, math.inf], (1, EarlyStopReason.NON_FINITE)),
    ({"patience": 2, "check_finite": False}, [1.0, NAN, NAN, 0.1], (2, P)),
    ({"patience": 2, "baseline": 0.5}, [0.8, 0.7, 0.6], (1, P)),
    ({"patience": 2, "baseline": 0.5}, [0.8, 0.4, 0.45, 0.3], None),
    ({"patience": 1, "start_from_epoch": 2}, [1.0, 2.0, 3.0, 4.0], (3, P)),
    ({"patience": 3}, [5.0, 4.0, 4.0, 3.0, 3.5, 3.2, 3.1, 3.0, 2.0], (6, P)),
]


def _run(
    rules: EarlyStopping, values: list[float], start: int = 0
) -> tuple[int, EarlyStopReason] | None:
    for epoch, value in enumerate(values[start:], start):
        decision = rules.update(epoch, value)
        if decision is not None and decision.stop:
            assert decision.reason is not None
            return epoch, decision.reason
    return None


@pytest.mark.parametrize(("params", "values", "expected"), TABLE)
def test_decisions(
    params: dict[str, Any], values: list[float], expected: tuple[int, EarlyStopReason] | None
) -> None:
    assert _run(EarlyStopping(**params), values) == expected


@pytest.mark.parametrize(("params", "values", "expected"), TABLE)
def test_resume_in_the_middle_keeps_patience(
    params: dict[str, Any], values: list[float], expected: tuple[int, EarlyStopReason] | None
) -> None:
    for split in range(1, len(values)):
        first = EarlyStopping(**params)
        stopped = _run(first, values[:split])
        if stopped is not None:  # stopped before the split: nothing to resume
            assert stopped == expected
            continue
        saved = json.loads(json.dumps(first.state_dict()))
        second = EarlyStopping(**params)
        second.load_state_dict(saved)
        assert _run(second, values, start=split) == expected


def test_update_is_idempotent_per_epoch() -> None:
    rules = EarlyStopping(patience=1)
    rules.update(0, 1.0)
    first = rules.update(1, 2.0)
    assert rules.update(1, 2.0) is first and rules.wait == 1


async def test_controller_stops_the_job_and_publishes() -> None:
    async with EventBus() as bus:
        channel = ControlChannel("job-1", publish=bus.publish)
        controller = EarlyStopController(
            job_id="job-1", channel=channel, bus=bus, monitor="val_acc", mode="max", patience=1
        )
        handle = bus.attach(controller)
        async with bus.subscribe("t", job_id="job-1", types=[EventType.EARLY_STOP]) as sub:
            for epoch, value in enumerate([0.5, 0.7, 0.6, 0.5]):
                event = await bus.publish_async(
                    "job-1",
                    EventType.FIT_EPOCH_END,
                    {"epoch": epoch, "step": epoch * 10, "metrics": {"val_acc": value}},
                )
                assert await anyio.to_thread.run_sync(bus.wait_processed, event, 5.0)
            with anyio.fail_after(5):
                early_stop = await sub.receive()
        await handle.detach()
    commands = channel.take()
    assert [(c.kind, c.source, c.reason) for c in commands] == [
        (CommandKind.STOP, "early_stop", "patience_exhausted")
    ]
    assert early_stop.data["reason"] == "patience_exhausted"
    assert early_stop.data["best"] == 0.7 and early_stop.data["best_epoch"] == 1
    assert early_stop.data["epoch"] == 2 and early_stop.data["monitor"] == "val_acc"


def test_restore_best_weights_survive_resume() -> None:
    channel = ControlChannel("job-1")
    trainer = ToyTrainer()
    controller = EarlyStopController(
        job_id="job-1", channel=channel, bus=None, patience=10, restore_best=True
    )
    controller.bind(trainer)
    best: dict[str, torch.Tensor] = {}
    for epoch, value in enumerate([0.9, 0.3, 0.6]):
        trainer.train_step()
        trainer.end_epoch({"val_loss": value})
        if epoch == 1:
            best = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    saved = trainer.state_dict()
    assert saved["controllers"]["early_stop"]["best_epoch"] == 1

    resumed = ToyTrainer(seed=3)
    controller2 = EarlyStopController(
        job_id="job-1", channel=channel, bus=None, patience=10, restore_best=True
    )
    controller2.bind(resumed)
    resumed.load_state_dict(saved)
    resumed.train_step()
    resumed.end_epoch({"val_loss": 0.8})
    resumed.run_callbacks("on_train_end")
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, best[key])
    assert controller2.rules.wait == 2 and controller2.rules.best == 0.3
