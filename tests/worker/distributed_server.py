"""What the tests of distributed jobs share: a real server that runs them (two CPU slots, the
ranks meeting on loopback) and a wait for a job's state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import TrainbusClient, create_app

ENDED = {"completed", "failed", "stopped", "interrupted"}


@contextmanager
def distributed_server(data_dir: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        data_dir,
        run_jobs_in="process",
        stop_grace_seconds=5.0,
        devices=["cpu:2"],
        distributed_rendezvous="127.0.0.1:0",
        resource_interval_seconds=0.5,
    )
    with run_server(create_app(settings), settings) as live:
        yield live


def wait_job(
    client: TrainbusClient, job_id: str, states: set[str], *, past_step: int = -1
) -> dict[str, Any]:
    """The job's record once it is in one of ``states`` past step ``past_step``."""
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["state"] not in states or record["step"] <= past_step:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return record
