"""Running the SDK's example scripts as a user runs them: in a process of their own, against a
real server, found and followed through the API."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient

ROOT = Path(__file__).parents[2]
EXAMPLES = ROOT / "examples"


def start_example(
    server: LiveServer, python: str | Path, script: str, cwd: Path, *args: str
) -> subprocess.Popen[str]:
    """``python examples/<script> args`` in ``cwd``, pointed at ``server``, with one torch
    thread: on a busy two-core machine (the server in this process, other tests) the spin-waits
    of two threads that keep losing their core made an epoch of the tiny BERT take 4-28 s
    instead of 0.5-2."""
    return subprocess.Popen(
        [str(python), str(EXAMPLES / script), *args],
        env={
            **os.environ,
            "TRAINBUS_URL": server.url,
            "TRAINBUS_TOKEN": server.token,
            "OMP_NUM_THREADS": "1",
        },
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def job_of(client: TrainbusClient, run_id: str, process: subprocess.Popen[str]) -> str:
    """The id of the job the example's run ``run_id`` made."""
    deadline = time.monotonic() + 90  # a fresh interpreter imports torch (and its framework)
    while True:
        named = [job for job in client.jobs(limit=200)["items"] if job["name"] == run_id]
        if named:
            return str(named[0]["id"])
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the example made no job"
        time.sleep(0.05)  # polling interval, bounded by the deadline


def wait_state(client: TrainbusClient, job_id: str, state: str) -> dict[str, Any]:
    """The job's record once it is in ``state``."""
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["state"] != state:
        assert time.monotonic() < deadline, (state, record)
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return record


def wait_step(client: TrainbusClient, job_id: str, step: int) -> dict[str, Any]:
    """The job's record once it has trained ``step`` steps."""
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["step"] < step:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return record
