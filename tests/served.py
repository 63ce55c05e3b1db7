"""A real ``trainbus serve`` in a process of its own, with a plugin folder on its
``PYTHONPATH`` and settings from its environment, as an operator starts one: its fork server
and workers load the plugin as the server does, and the test can SIGKILL it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from tests.conftest import free_port
from trainbus.api import TrainbusClient

ROOT = Path(__file__).parents[1]
TOKEN = "served-test-token-0123456789"


@dataclass(frozen=True)
class Served:
    process: subprocess.Popen[bytes]
    url: str
    log: Path
    data_dir: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def client(self) -> TrainbusClient:
        return TrainbusClient(self.url, TOKEN)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def get(self, path: str, token: str | None = TOKEN) -> httpx.Response:
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        return httpx.get(self.url + path, headers=headers, timeout=10)

    def metrics(self) -> str:
        response = httpx.get(self.url + "/metrics", headers=self.headers, timeout=10)
        response.raise_for_status()
        return response.text

    def descendants(self) -> list[psutil.Process]:
        """Every process started under the server (its fork server, the workers)."""
        return psutil.Process(self.pid).children(recursive=True)


@contextmanager
def serve(data_dir: Path, site: Path | None = None, **settings: str) -> Iterator[Served]:
    """Start ``trainbus serve`` on ``data_dir`` and a free port (``settings`` become its
    ``TRAINBUS_*`` environment); wait until it is ready; end it with SIGTERM afterwards."""
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    path = [str(ROOT)] if site is None else [str(site), str(ROOT)]
    environment.update(
        PYTHONPATH=os.pathsep.join(path),
        TRAINBUS_TOKEN=TOKEN,
        **{f"TRAINBUS_{name.upper()}": value for name, value in settings.items()},
    )
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir / "server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "trainbus.api.cli", "serve", "--port", str(port),
             "--data-dir", str(data_dir), "--log-level", "warning"],
            env=environment, stdout=output, stderr=subprocess.STDOUT, cwd=ROOT,
        )  # fmt: skip
    served = Served(process, f"http://127.0.0.1:{port}", log, data_dir)
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, log.read_text()
            try:
                answer = httpx.get(served.url + "/readyz", headers=served.headers, timeout=1)
                ready = answer.status_code == 200
            except httpx.TransportError:
                ready = False
            if ready:
                break
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.05)  # polling readiness, bounded by the deadline
        yield served
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
