"""LR plateau: Keras' ReduceLROnPlateau rules against a table, resume, and the bus."""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from trainbus.bus import CommandKind, ControlChannel, EventBus, EventType
from trainbus.subscribers import LRPlateau, LRPlateauController

# (parameters, start lr, monitored values per epoch, {epoch: new lr})
TABLE: list[tuple[dict[str, Any], float, list[float], dict[int, float]]] = [
    ({"factor": 0.5, "patience": 2, "min_delta": 0.0}, 1.0, [1, 1, 1, 1, 1], {2: 0.5, 4: 0.25}),
    ({"factor": 0.5, "patience": 2, "min_delta": 0.0}, 1.0, [3, 2, 2.5, 1, 1.5, 1.2], {5: 0.5}),
    ({"factor": 0.5, "patience": 1, "min_delta": 0.5}, 1.0, [3, 2.6, 2.0], {1: 0.5}),
    ({"factor": 0.1, "patience": 1, "cooldown": 2}, 1.0, [1, 1, 1, 1, 1], {1: 0.1, 3: 0.01}),
    ({"factor": 0.1, "patience": 1, "min_lr": 0.05}, 0.1, [1, 1, 1, 1], {1: 0.05}),
    ({"factor": 0.5, "patience": 1, "mode": "max"}, 1.0, [0.1, 0.2, 0.2, 0.3], {2: 0.5}),
    ({"factor": 0.5, "patience": 3}, 1.0, [1, 1, 1, 0.5, 1, 1, 1], {6: 0.5}),
]


def _run(rules: LRPlateau, lr: float, values: list[float], start: int = 0) -> dict[int, float]:
    changes = {}
    for epoch, value in enumerate(values[start:], start):
        new_lr = rules.update(epoch, value, lr)
        if new_lr is not None:
            changes[epoch] = lr = new_lr
    return changes


def _lr_at(start_lr: float, changes: dict[int, float], epoch: int) -> float:
    lr = start_lr
    for changed_at, value in sorted(changes.items()):
        if changed_at < epoch:
            lr = value
    return lr


@pytest.mark.parametrize(("params", "lr", "values", "expected"), TABLE)
def test_decisions(
    params: dict[str, Any], lr: float, values: list[float], expected: dict[int, float]
) -> None:
    assert _run(LRPlateau(**params), lr, values) == pytest.approx(expected)


@pytest.mark.parametrize(("params", "lr", "values", "expected"), TABLE)
def test_resume_in_the_middle(
    params: dict[str, Any], lr: float, values: list[float], expected: dict[int, float]
) -> None:
    for split in range(1, len(values)):
        first = LRPlateau(**params)
        before = _run(first, lr, values[:split])
        second = LRPlateau(**params)
        second.load_state_dict(json.loads(json.dumps(first.state_dict())))
        after = _run(second, _lr_at(lr, before, split), values, start=split)
        assert {**before, **after} == pytest.approx(expected)


def test_factor_must_lower_the_rate() -> None:
    with pytest.raises(ValueError, match="factor"):
        LRPlateau(factor=1.0)


async def test_controller_sends_set_lr() -> None:
    async with EventBus() as bus:
        channel = ControlChannel("job-1", publish=bus.publish)
        controller = LRPlateauController(
            job_id="job-1", channel=channel, factor=0.5, patience=1, min_delta=0.0
        )
        handle = bus.attach(controller)
        for epoch, value in enumerate([1.0, 1.0]):
            event = await bus.publish_async(
                "job-1",
                EventType.FIT_EPOCH_END,
                {"epoch": epoch, "step": epoch, "metrics": {"val_loss": value, "lr": 0.2}},
            )
            assert await anyio.to_thread.run_sync(bus.wait_processed, event, 5.0)
        await handle.detach()
    (command,) = channel.take()
    assert command.kind is CommandKind.SET_LR and command.source == "lr_plateau"
    assert command.value == pytest.approx(0.1)
    assert "val_loss" in command.reason
    assert controller.state_dict() == {"best": 1.0, "wait": 0, "cooldown_counter": 0}
