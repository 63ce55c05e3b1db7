"""A flood of idle TCP connections against a real ``trainbus serve`` process whose open-file
limit is low (256), with a job training meanwhile.

Connections that send nothing are closed by the server within ``request_timeout``; those that
would eat into the descriptor reserve are closed at accept. The server's own work never runs
out of descriptors: /healthz answers again within the bound, the job completes with its
checkpoints, /readyz is 200 afterwards, and SIGTERM still ends the process.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, serve_command
from trainbus.api import TrainbusClient

from .conftest import record

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_NOFILE, /proc")

TOKEN = "flood-test-token-0123"
OPEN_FILE_LIMIT = 256
IDLE_CONNECTIONS = 300
REQUEST_TIMEOUT = 2.0
BOUND = REQUEST_TIMEOUT + 8.0
"""How long after the flood the server may take to close every idle connection and answer."""
SPEC = {
    "model": {"name": "mlp"},
    "dataset": {"name": "digits"},
    "epochs": 10,
    "batch_size": 16,
    "checkpoint": {"every_n_epochs": 1, "keep_last": 2},
}


def _lower_open_file_limit() -> None:
    import resource

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILE_LIMIT, hard))


@contextmanager
def serve(data_dir: Path, log: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    env = {
        **os.environ,
        "TRAINBUS_TOKEN": TOKEN,
        "TRAINBUS_REQUEST_TIMEOUT": str(REQUEST_TIMEOUT),
        "TRAINBUS_RESOURCE_INTERVAL_SECONDS": "0.2",
    }
    with log.open("wb") as output:
        process = subprocess.Popen(
            serve_command(port, data_dir, TOKEN),
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            preexec_fn=_lower_open_file_limit,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)  # polling start-up, bounded by the deadline
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def _healthy_within(url: str, seconds: float) -> float:
    """Seconds until /healthz answers 200 (fails the test past ``seconds``)."""
    started = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return time.monotonic() - started
        except httpx.TransportError:
            pass
        assert time.monotonic() - started < seconds, f"/healthz silent for {seconds} s"
        time.sleep(0.05)  # polling, bounded by the deadline


def _closed_by_server(sockets: list[socket.socket], seconds: float) -> float:
    """Seconds until the server has closed every socket (fails the test past ``seconds``)."""
    started = time.monotonic()
    open_ = {s.fileno(): s for s in sockets}
    while open_:
        left = seconds - (time.monotonic() - started)
        assert left > 0, f"{len(open_)} idle connections still open after {seconds} s"
        readable, _, _ = select.select(list(open_), [], [], left)
        for fileno in readable:
            try:
                data = open_[fileno].recv(1)
            except ConnectionResetError:
                data = b""
            assert data == b"", "the server sent something on a connection that sent nothing"
            del open_[fileno]
    return time.monotonic() - started


def test_idle_connections_never_starve_the_server_of_descriptors(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with serve(tmp_path / "data", log) as (process, url), TrainbusClient(url, TOKEN) as client:
        job = client.submit(SPEC)
        client.wait(job["id"], {"running"}, timeout=60)
        host, port = url.removeprefix("http://").split(":")
        with ExitStack() as stack:
            started = time.monotonic()
            sockets = [
                stack.enter_context(socket.create_connection((host, int(port)), timeout=10))
                for _ in range(IDLE_CONNECTIONS)
            ]
            healthy_after = _healthy_within(url, BOUND)
            closed_after = _closed_by_server(sockets, BOUND)
            flood_seconds = time.monotonic() - started
        finished = client.wait(job["id"], timeout=120)
        assert finished["state"] == "completed", finished
        assert client.checkpoints(job["id"])
        ready = httpx.get(url + "/readyz", headers={"Authorization": f"Bearer {TOKEN}"})
        assert ready.status_code == 200, ready.text
        metrics = httpx.get(url + "/metrics").text
        closed = {
            name: float(line.split()[-1])
            for line in metrics.splitlines()
            for name in ("trainbus_connections_refused", "trainbus_connections_timed_out")
            if line.startswith(name + "_total ")
        }
        assert sum(closed.values()) >= IDLE_CONNECTIONS, closed  # and refused /healthz polls
        second = client.submit({**SPEC, "epochs": 1})
        assert client.wait(second["id"], timeout=60)["state"] == "completed"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    output = log.read_text()
    assert "Too many open files" not in output, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    record(
        "1 idle connection flood",
        open_file_limit=OPEN_FILE_LIMIT,
        idle_connections=IDLE_CONNECTIONS,
        request_timeout=REQUEST_TIMEOUT,
        healthz_after_seconds=round(healthy_after, 2),
        all_closed_after_seconds=round(closed_after, 2),
        flood_seconds=round(flood_seconds, 2),
        refused_at_accept=closed["trainbus_connections_refused"],
        timed_out=closed["trainbus_connections_timed_out"],
    )
