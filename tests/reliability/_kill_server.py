"""Real ``trainbus serve`` processes to SIGKILL, forked by a zygote so a restart costs little.

:class:`ServerZygote` runs ``_kill_serve_child.py``, which imports the service once;
:meth:`ServerZygote.serve` forks a fresh ``trainbus serve`` on a data folder and a free port
and waits until it is ready; :meth:`ServerZygote.kill` SIGKILLs one and waits until it is gone.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from trainbus.api import TrainbusClient

from ..conftest import free_port

CHILD = Path(__file__).with_name("_kill_serve_child.py")
ROOT = Path(__file__).parents[2]


@dataclass(frozen=True)
class Server:
    """One running ``trainbus serve`` process."""

    pid: int
    url: str
    token: str
    ready_seconds: float

    def client(self) -> TrainbusClient:
        return TrainbusClient(self.url, self.token)


class ServerZygote:
    """Forks ``trainbus serve`` processes (several may run at once)."""

    def __init__(self, token: str, log_path: Path) -> None:
        self.token = token
        self._log = log_path.open("wb")
        self._process = subprocess.Popen(
            [sys.executable, str(CHILD), "--token", token],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,  # every server's log
            env={**os.environ, "TRAINBUS_TOKEN": token, "PYTHONPATH": str(ROOT)},
            cwd=ROOT,
        )
        self._started: queue.Queue[str] = queue.Queue()
        self._exited: dict[int, int] = {}
        self._changed = threading.Condition()
        self._running: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            line = raw.decode().strip()
            if line.startswith("exited "):
                _, pid, status = line.split()
                with self._changed:
                    self._exited[int(pid)] = int(status)
                    self._changed.notify_all()
            else:
                self._started.put(line)
        self._started.put("zygote gone")

    def _expect(self, prefix: str, timeout: float) -> str:
        try:
            line = self._started.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"the server zygote did not say {prefix!r} in time") from None
        assert line.startswith(prefix), f"expected {prefix!r} from the zygote, got {line!r}"
        return line

    def wait_warm(self, timeout: float = 120.0) -> None:
        """Wait until the zygote has imported the service (call once, first)."""
        self._expect("warm", timeout)

    def serve(self, data_dir: Path, timeout: float = 60.0, *, store_delay: float = 0.0) -> Server:
        """Fork a server on ``data_dir`` and a free port; wait until ``/readyz`` says ready.

        ``store_delay``: seconds each of its event store's writes waits first."""
        started = time.monotonic()
        port = free_port()
        stdin = self._process.stdin
        assert stdin is not None
        delay = f"--store-delay {store_delay} " if store_delay else ""
        stdin.write(
            f"{delay}serve --port {port} --data-dir {data_dir} --log-level warning\n".encode()
        )
        stdin.flush()
        pid = int(self._expect("started ", timeout).split()[1])
        self._running.add(pid)
        url = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {self.token}"}
        while True:
            with self._changed:
                assert pid not in self._exited, f"the server exited during start-up: {pid}"
            try:
                if httpx.get(url + "/readyz", headers=headers, timeout=1).status_code == 200:
                    return Server(pid, url, self.token, time.monotonic() - started)
            except httpx.TransportError:
                pass
            assert time.monotonic() - started < timeout, "the server did not get ready"
            time.sleep(0.02)  # polling readiness, bounded by the deadline

    def kill(self, server: Server, timeout: float = 30.0) -> None:
        """SIGKILL ``server`` and wait until the zygote has reaped it."""
        assert server.pid in self._running, "that server is not running"
        os.kill(server.pid, signal.SIGKILL)
        with self._changed:
            reaped = self._changed.wait_for(lambda: server.pid in self._exited, timeout)
            assert reaped, f"server {server.pid} was not reaped in time"
            status = self._exited[server.pid]
        self._running.discard(server.pid)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status

    def close(self) -> None:
        """End the zygote, which kills the servers still running."""
        if self._process.stdin is not None:
            self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=30)
        self._reader.join(timeout=30)
        if self._process.stdout is not None:
            self._process.stdout.close()
        self._log.close()


@contextmanager
def live_events(
    client: TrainbusClient, job_id: str, after_seq: int, types: str
) -> Iterator[Iterator[dict[str, Any]]]:
    """The job's events over its WebSocket stream (stored ones after ``after_seq``, then live
    as they are published); the connection closes when the block ends."""
    stream = client.stream(job_id, after_seq=after_seq, types=types)
    try:
        yield stream
    finally:
        close = getattr(stream, "close", None)  # a generator: closing it closes the socket
        if close is not None:
            close()


def all_events(client: TrainbusClient, job_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
    """Every stored event of the job after ``after_seq``, in ``seq`` order (page by page; for
    a job that is not training, or the pages could go on as long as it does)."""
    events: list[dict[str, Any]] = []
    while True:
        after = events[-1]["seq"] if events else after_seq
        page = client.events(job_id, after_seq=after, limit=10_000)
        if not page:
            return events
        events.extend(page)
