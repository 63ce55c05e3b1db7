"""The plugin example of docs/plugins.md, installed as a user would (pip, no network), runs as
a job on a real server."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from trainbus.api import TrainbusClient

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "trainbus-plugin-example"
TOKEN = "plugin-test-token-0123"


def test_the_plugin_example_installs_and_trains(tmp_path: Path) -> None:
    source = shutil.copytree(EXAMPLE, tmp_path / "example")  # the build writes beside it
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
         "--no-deps", "--no-index", "--target", str(site), str(source)],
        check=True,
        timeout=120,
    )  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    env.update(PYTHONPATH=str(site), TRAINBUS_TOKEN=TOKEN)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "trainbus.api.cli", "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data"), "--log-level", "warning"],
        env=env,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, "the server exited"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)  # polling interval while the server starts, bounded by deadline
        with TrainbusClient(url, TOKEN) as api:
            registry = api.registry()
            assert "residual_mlp" in [m["name"] for m in registry["models"]]
            assert "two_moons" in [d["name"] for d in registry["datasets"]]
            job = api.submit(
                {
                    "model": {"name": "residual_mlp", "params": {"width": 32, "blocks": 2}},
                    "dataset": {"name": "two_moons", "params": {"n_samples": 600}},
                    "epochs": 15,
                    "batch_size": 32,
                    "seed": 0,
                }
            )
            record = api.wait(job["id"], timeout=120)
            assert record["state"] == "completed", record
            assert record["metrics"]["val_accuracy"] > 0.9
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
