"""A real ``trainbus serve`` on a free loopback port, for the benches that measure through
one."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

__all__ = ["free_port", "serve", "train_job"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def serve(
    data_dir: Path, token: str, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start the server with its data under ``data_dir / "server"``; the process and its
    URL once it answers. Stop it with SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "trainbus.api.cli", "--token", token, "serve", "--port",
         str(port), "--data-dir", str(data_dir / "server"), "--log-level", "warning"],
        env={**os.environ, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            raise SystemExit("trainbus serve did not start")
        time.sleep(0.05)  # polling interval while the server starts, bounded by the deadline


def train_job(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """Train ``body`` as a job through the server until it completes: the seconds from its
    ``train_start`` to its ``train_end``, and its ``train_start`` event."""
    job_id = client.post("/jobs", json=body).raise_for_status().json()["id"]
    deadline = time.monotonic() + 600
    while (record := client.get(f"/jobs/{job_id}").json())["state"] not in (
        "completed", "failed", "stopped", "interrupted"
    ):  # fmt: skip
        if time.monotonic() > deadline:
            raise SystemExit(f"the job did not end: {record}")
        # the times come from the events: each poll is only load on the server under measurement
        time.sleep(1.0)
    if record["state"] != "completed":
        raise SystemExit(f"the job did not complete: {record}")
    events = client.get(f"/jobs/{job_id}/events", params={"types": "train_start,train_end"}).json()
    times = {event["type"]: event["time"] for event in events}
    return float(times["train_end"] - times["train_start"]), events[0]
