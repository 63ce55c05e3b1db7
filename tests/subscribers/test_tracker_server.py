"""Trackers through the real server: a spec's ``trackers`` section (or the server's
defaults) attaches the exporter per job; a tracker whose package is missing is a 422 naming
the extra to install."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.server import make_settings, run_server
from trainbus.api import AsyncTrainbusClient, create_app
from trainbus.subscribers import _trackers

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _spec(**overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
        "dataset": {"name": "digits"},
        "epochs": 2,
        "batch_size": 128,
        "torch_threads": 1,
    }
    spec.update(overrides)
    return spec


async def test_spec_and_server_defaults_attach_trackers_and_missing_packages_are_422(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(tmp_path / "data", trackers=["tensorboard"])
    with run_server(create_app(settings), settings) as server:
        async with AsyncTrainbusClient(server.url, server.token) as client:
            job = await client.submit(_spec())  # on by the server's default alone
            record = await client.wait(job["id"], timeout=120)
        assert record["state"] == "completed"
        log_dir = settings.data_dir / "jobs" / job["id"] / "tensorboard"
        accumulator = event_accumulator.EventAccumulator(str(log_dir), {"scalars": 0})
        accumulator.Reload()
        assert len(accumulator.Scalars("val_loss")) == 2

        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            no_uri = await http.post("/jobs", json=_spec(trackers={"mlflow": {}}))
            monkeypatch.setitem(
                _trackers.TRACKER_EXTRAS, "wandb", ("trainbus_no_such_module", "trainbus[wandb]")
            )
            missing = await http.post("/jobs", json=_spec(trackers={"wandb": {"mode": "offline"}}))
            unknown = await http.post("/jobs", json=_spec(trackers={"comet": {}}))
            total = (await http.get("/jobs")).json()["total"]
    assert no_uri.status_code == 422, no_uri.text
    assert "TRAINBUS_MLFLOW_TRACKING_URI" in no_uri.text
    assert missing.status_code == 422, missing.text
    assert "pip install 'trainbus[wandb]'" in missing.text
    assert unknown.status_code == 422 and "comet" in unknown.text
    assert total == 1  # none of the refused jobs was created
