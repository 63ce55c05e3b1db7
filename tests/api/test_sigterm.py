"""SIGTERM on a real ``trainbus serve`` process: running jobs come back ``interrupted``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from trainbus.api import TrainbusClient

from ..conftest import free_port, serve_command

TOKEN = "sigterm-test-token-42"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@contextmanager
def serve(data_dir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    process = subprocess.Popen(
        serve_command(port, data_dir, TOKEN),
        env={**os.environ, "TRAINBUS_TOKEN": TOKEN},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its process group is its own: the test may signal it all
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            assert process.poll() is None, "the server exited during start-up"
            try:
                if (
                    httpx.get(
                        url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=1
                    ).status_code
                    == 200
                ):
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)  # polling readiness, bounded by the deadline
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


@pytest.mark.parametrize("to", ["server", "process group"])
def test_sigterm_checkpoints_and_interrupts_running_jobs(data_dir: Path, to: str) -> None:
    """Whether the server alone gets SIGTERM (``docker stop``) or every process of the
    service does (systemd's stop, ``timeout``), a running job ends ``interrupted``."""
    spec = {
        "model": {"name": "mlp"},
        "dataset": {"name": "digits"},
        "epochs": 500,
        "batch_size": 16,
    }
    with serve(data_dir) as (process, url):
        with TrainbusClient(url, TOKEN) as client:
            job = client.submit(spec)
            client.wait(job["id"], {"running"}, timeout=60)
            deadline = time.monotonic() + 60
            while client.job(job["id"])["step"] == 0:  # its worker trains
                assert time.monotonic() < deadline, "the job did not train"
                time.sleep(0.05)  # polling interval, bounded by the deadline
        if to == "server":
            process.send_signal(signal.SIGTERM)
        else:  # the server, its fork server and the job's worker at once
            os.killpg(process.pid, signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    with serve(data_dir) as (_process, url), TrainbusClient(url, TOKEN) as client:
        record = client.job(job["id"])
        assert record["state"] == "interrupted", record.get("error")
        assert client.events(job["id"], types="job_interrupted")
        client.resume(job["id"])
        client.wait(job["id"], {"running"}, timeout=60)
        client.stop(job["id"])
        assert client.wait(job["id"], timeout=60)["state"] == "stopped"
