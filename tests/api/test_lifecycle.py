"""Start-up and shutdown of the app: readiness, refusing work while stopping, closing streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from trainbus.api import Runtime, Settings, create_app
from trainbus.bus import EventBus

from .fakes import FakeJobs
from .server import make_settings, run_server


async def test_shutdown_stops_accepting_then_tears_the_runtime_down(data_dir: Path) -> None:
    seen: dict[str, object] = {}
    jobs = FakeJobs()
    jobs.add("j1")

    @asynccontextmanager
    async def runtime(settings: Settings, bus: EventBus) -> AsyncIterator[Runtime]:
        yield Runtime(jobs=jobs)
        # the runtime is torn down after the app stopped accepting jobs, bus still open
        seen["bus_open_at_teardown"] = not bus.closed

    settings = make_settings(data_dir)
    app = create_app(settings, runtime=runtime)
    with run_server(app, settings) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
            ready = await client.get("/readyz")
            assert ready.status_code == 200 and ready.json()["status"] == "ready"
        socket = await connect(
            server.ws_url + "/jobs/j1/events/ws", additional_headers=server.headers, proxy=None
        )
        server.server.should_exit = True
        with anyio.fail_after(30), pytest.raises(ConnectionClosed):
            await socket.recv()
    assert seen["bus_open_at_teardown"] is True


def test_a_token_is_generated_when_none_is_set(data_dir: Path) -> None:
    settings = Settings(port=0, data_dir=data_dir)
    assert settings.token is None
    app = create_app(settings, runtime=lambda s, b: None)  # type: ignore[arg-type,return-value]
    assert app.state.settings.token is not None


async def test_a_job_too_large_for_its_memory_budget_is_refused_with_the_estimate(
    data_dir: Path,
) -> None:
    settings = make_settings(data_dir, max_job_memory_bytes=8 * 2**30)
    huge = {  # each field within its bounds; together about 20 GiB
        "model": {"name": "mlp", "params": {"hidden_sizes": [4096] * 8}},
        "dataset": {
            "name": "synthetic_classification",
            "params": {"n_samples": 781_250, "n_features": 64, "n_classes": 10},
        },
        "batch_size": 65_536,
        "epochs": 1,
    }
    with run_server(create_app(settings), settings) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as client:
            refused = await client.post("/jobs", json=huge)
            assert refused.status_code == 422, refused.text
            message = str(refused.json())
            assert "GiB of memory" in message and "8.0 GiB a job may take" in message
            assert "activations" in message and "max_job_memory_bytes" in message
            small = {**huge, "model": {"name": "mlp"}, "batch_size": 64}
            small["dataset"] = {"name": "iris"}
            accepted = await client.post("/jobs", json=small)
            assert accepted.status_code in (200, 201), accepted.text
            listed = (await client.get("/jobs")).json()
    assert [job["id"] for job in listed["items"]] == [accepted.json()["id"]]


def test_the_default_memory_budget_is_half_the_machine(data_dir: Path) -> None:
    total = psutil.virtual_memory().total
    assert Settings(data_dir=data_dir).job_memory_limit == total // 2
    assert Settings(data_dir=data_dir, max_job_memory_bytes=123).job_memory_limit == 123
