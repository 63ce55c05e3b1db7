"""Fixtures for the deployment checks: the shipped files, Debian's Prometheus tools, and the
metric names a real trainbus server exposes after a real job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api.server import make_settings, run_server
from trainbus.api import TrainbusClient, create_app

from .promql import exposed_names

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"

SMALL_JOB: dict[str, Any] = {
    "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
    "dataset": {"name": "digits"},
    "epochs": 1,
    "batch_size": 64,
    "seed": 0,
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    document = load_yaml(REPO / "docker-compose.yml")
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="session")
def prometheus_config() -> dict[str, Any]:
    document = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="session")
def rules() -> dict[str, Any]:
    document = load_yaml(DEPLOY / "prometheus" / "rules.yml")
    assert isinstance(document, dict)
    return document


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    document = json.loads((DEPLOY / "grafana" / "dashboards" / "trainbus.json").read_text())
    assert isinstance(document, dict)
    return document


def _prometheus_tool(name: str) -> str:
    """The path of ``promtool`` or ``prometheus`` from Debian's ``prometheus`` package,
    installed here when missing and we are root (as ``make test`` does)."""
    found = shutil.which(name)
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.skip(
            f"{name} is missing and installing Debian's prometheus package needs root "
            "(run `sudo apt-get install prometheus`; CI runs `make test` as root, which does)"
        )
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=600, env=environment)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "prometheus"], check=True, timeout=600, env=environment
    )
    found = shutil.which(name)
    assert found is not None, f"apt-get installed prometheus but {name} is not on PATH"
    return found


@pytest.fixture(scope="session")
def promtool() -> str:
    return _prometheus_tool("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _prometheus_tool("prometheus")


@pytest.fixture(scope="session")
def exposed_metrics(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """Every series name the real exporter offers once a real (small) job has completed on a
    real server (real job manager and subscribers; /metrics wants the token, as
    docker-compose.yml configures it). The server stops before the tests run."""
    settings = make_settings(tmp_path_factory.mktemp("data"), metrics_require_token=True)
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
    ):
        job = client.submit(SMALL_JOB)
        record = client.wait(job["id"], timeout=90)
        assert record["state"] == "completed", record
        exposition = client.metrics()
        unauthorised = httpx.get(server.url + "/metrics", timeout=10)
        assert unauthorised.status_code == 401  # so Prometheus must send the token
    names = exposed_names(exposition)
    assert "trainbus_job_step" in names, exposition[:2000]
    return names
