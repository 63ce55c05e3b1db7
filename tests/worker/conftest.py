from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from trainbus.bus import EventBus


@pytest.fixture
async def bus() -> AsyncIterator[EventBus]:
    async with EventBus() as event_bus:
        yield event_bus


def small_spec(**overrides: object) -> dict[str, object]:
    """A fast job: iris, a small MLP, three epochs of eight batches."""
    spec: dict[str, object] = {
        "model": {"name": "mlp", "params": {"hidden_sizes": [16], "dropout": 0.2}},
        "dataset": {"name": "iris"},
        "epochs": 3,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "step", "params": {"step_size": 1, "gamma": 0.9}},
        "seed": 7,
    }
    spec.update(overrides)
    return spec


@pytest.fixture
def datasets_dir(data_dir: Path) -> Path:
    folder = data_dir / "datasets"
    folder.mkdir()
    return folder
