"""The supervisor and its worker processes, through a real server: a worker that dies ends
its job alone, `failed` with how it died; a stop a worker does not answer escalates to
SIGTERM and SIGKILL and still ends the job `stopped`; a job whose step stands still is
reported `job_stalled` and, with ``on_stall: fail``, ended."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import TrainbusClient, create_app

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

LONG = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 500,
        "batch_size": 16, "torch_threads": 1}  # fmt: skip
SHORT = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("data"),
        run_jobs_in="process",
        stop_grace_seconds=1.0,
        max_running_jobs=2,
        resource_interval_seconds=60.0,
    )
    with run_server(create_app(settings), settings) as live:
        yield live


def _worker_pid(server: LiveServer, job_id: str) -> int:
    supervisor = server.services.jobs.manager.supervisor  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while (run := supervisor.runs.get(job_id)) is None or run.process is None:
        assert time.monotonic() < deadline, "the job's worker did not start"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return int(run.process.pid)


def _wait(client: TrainbusClient, job_id: str, states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["state"] not in states:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return record


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_worker_fails_its_job_alone(server: LiveServer) -> None:
    with TrainbusClient(server.url, server.token) as client:
        doomed = client.submit(LONG)["id"]
        _wait(client, doomed, {"running"})
        pid = _worker_pid(server, doomed)
        os.kill(pid, signal.SIGKILL)
        record = _wait(client, doomed, {"failed", "completed", "stopped", "interrupted"})
        assert record["state"] == "failed", record
        assert "SIGKILL" in record["error"]["message"], record["error"]
        assert record["error"]["exitcode"] == -signal.SIGKILL
        # the server and its other jobs go on
        after = client.submit(SHORT)["id"]
        assert _wait(client, after, {"completed", "failed"})["state"] == "completed"


def test_a_stop_the_worker_does_not_answer_escalates_and_still_ends_stopped(
    server: LiveServer,
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(LONG)["id"]
        _wait(client, job_id, {"running"})
        pid = _worker_pid(server, job_id)
        os.kill(pid, signal.SIGSTOP)  # hung: it neither trains nor answers
        started = time.monotonic()
        client.stop(job_id)
        record = _wait(client, job_id, {"stopped", "failed", "completed", "interrupted"})
        elapsed = time.monotonic() - started
    assert record["state"] == "stopped", record
    assert "grace period" in (record["stop_reason"] or ""), record
    # SIGTERM after 1 s of grace cannot run in a stopped process; SIGKILL after 1 s more
    assert elapsed < 10, elapsed
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, "the worker outlived its stop"
        time.sleep(0.05)  # polling interval, bounded by the deadline


def test_a_stalled_job_is_reported_and_failed_with_on_stall_fail(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", run_jobs_in="process",
                             resource_interval_seconds=60.0)  # fmt: skip
    with run_server(create_app(settings), settings) as server, TrainbusClient(
        server.url, server.token
    ) as client:
        spec = {**LONG, "stall_timeout_seconds": 1.0, "on_stall": "fail"}
        job_id = client.submit(spec)["id"]
        _wait(client, job_id, {"running"})
        pid = _worker_pid(server, job_id)
        os.kill(pid, signal.SIGSTOP)  # its step stops moving, and so do its heartbeats
        record = _wait(client, job_id, {"failed", "stopped", "completed", "interrupted"})
        stalled = client.events(job_id, types="job_stalled")
    assert record["state"] == "failed", record
    assert "stalled" in record["error"]["message"], record["error"]
    assert stalled and isinstance(stalled[0]["data"].get("step"), int), stalled
    # a stopped process cannot write its stack (faulthandler runs in it): the field is there,
    # empty; a process hung in Python code fills it
    assert stalled[0]["data"]["action"] == "fail" and "stack" in stalled[0]["data"]
