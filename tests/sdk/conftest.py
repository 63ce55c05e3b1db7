"""A real trainbus server for each SDK test module (SDK runs train in the test's processes, so
the server runs jobs on threads)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import create_app


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("data"), run_jobs_in="thread", resource_interval_seconds=60.0
    )
    with run_server(create_app(settings), settings) as live:
        yield live
