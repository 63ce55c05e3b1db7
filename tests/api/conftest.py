"""Servers for the API tests: one with a stand-in job side, one with the real one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from trainbus.api import create_app

from .fakes import FakeJobs, MemoryHistory, fake_runtime
from .server import LiveServer, make_settings, run_server


@pytest.fixture(scope="module")
def fake_jobs() -> FakeJobs:
    return FakeJobs()


@pytest.fixture(scope="module")
def transport_server(
    tmp_path_factory: pytest.TempPathFactory, fake_jobs: FakeJobs
) -> Iterator[LiveServer]:
    """A real uvicorn server whose job side is a stand-in: tests publish onto its bus."""
    settings = make_settings(
        tmp_path_factory.mktemp("data"),
        ws_buffer_size=64,
        ws_max_lag=2000,
        ws_close_timeout=20.0,
    )
    app = create_app(settings, runtime=fake_runtime(fake_jobs, MemoryHistory()))
    with run_server(app, settings) as server:
        yield server
