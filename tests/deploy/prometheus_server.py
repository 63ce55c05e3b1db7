"""A real Prometheus server (Debian's ``prometheus``) on a free loopback port, and queries."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx

from tests.conftest import free_port

T = TypeVar("T")


@dataclass
class PrometheusServer:
    url: str
    log: Path

    def log_tail(self, characters: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """The instant vector ``expression`` evaluates to now."""
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expression}, timeout=10)
        response.raise_for_status()
        body = response.json()
        assert body["status"] == "success", body
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expression: str) -> float | None:
        """The value of a one-element result, None for an empty one."""
        result = self.query(expression)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    def api(self, path: str) -> Any:
        response = httpx.get(f"{self.url}/api/v1/{path}", timeout=10)
        response.raise_for_status()
        return response.json()["data"]

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float = 60.0) -> T:
        """Poll ``probe`` until it returns something other than None (or False)."""
        deadline = time.monotonic() + timeout
        while True:
            result = probe()
            if result is not None and result is not False:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never showed {what}; its log:\n{self.log_tail()}")
            time.sleep(0.1)  # polling interval, bounded by the deadline


@contextmanager
def run_prometheus(
    binary: str, config: Path, directory: Path, *, deadline: float = 30.0
) -> Iterator[PrometheusServer]:
    """Run ``prometheus`` with ``config`` until the block ends; waits for ``/-/ready``."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                "--log.level=info",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    server = PrometheusServer(url=url, log=log)
    try:
        stop_at = time.monotonic() + deadline
        while True:
            if process.poll() is not None:
                raise AssertionError(
                    f"prometheus exited with {process.returncode}:\n{server.log_tail()}"
                )
            try:
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > stop_at:
                raise AssertionError(f"prometheus was not ready in time:\n{server.log_tail()}")
            time.sleep(0.05)  # polling interval while it starts, bounded by the deadline
        yield server
    except BaseException:
        _stop(process)
        raise
    returncode = _stop(process)
    assert returncode == 0, f"prometheus exited with {returncode}:\n{server.log_tail()}"


def _stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (Prometheus then shuts down cleanly), SIGKILL after 30 seconds."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return -9
