"""A real Prometheus server scrapes a real trainbus server with the shipped scrape config and
rules while a real job trains: the job's step rises in Prometheus, its state moves through
paused to completed, the recording rules produce throughput and every rule evaluates."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import TrainbusClient, create_app

from .conftest import DEPLOY
from .prometheus_server import PrometheusServer, run_prometheus

pytestmark = pytest.mark.slow

JOB: dict[str, Any] = {
    "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
    "dataset": {"name": "digits"},
    "epochs": 3,
    "batch_size": 32,  # 45 steps an epoch: the pause lands long before the end
    "seed": 0,
}


@pytest.fixture(scope="module")
def trainbus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """A fresh server, so that its job counts start at zero."""
    settings = make_settings(tmp_path_factory.mktemp("data"), metrics_require_token=True)
    with run_server(create_app(settings), settings) as live:
        yield live


def _scrape_config(trainbus: LiveServer, directory: Path) -> Path:
    """The shipped prometheus.yml and rules.yml with this machine's paths and a 1 s pace."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
    for group in rules["groups"]:
        group["interval"] = "1s"
    (directory / "rules.yml").write_text(yaml.safe_dump(rules))
    token = directory / "trainbus_token"
    token.write_text(trainbus.token)
    token.chmod(0o600)
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(directory / "rules.yml")]
    (job,) = config["scrape_configs"]
    job["authorization"]["credentials_file"] = str(token)
    job["static_configs"] = [{"targets": [trainbus.url.removeprefix("http://")]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def _wait_for_state(client: TrainbusClient, job_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["state"] != state:
        assert record["state"] in ("queued", "running", "paused"), record
        assert time.monotonic() < deadline, f"job {job_id} never became {state}: {record}"
        time.sleep(0.01)  # polling interval, bounded by the deadline
    return record


def test_prometheus_sees_a_job_train_pause_and_complete(
    trainbus: LiveServer, prometheus_binary: str, tmp_path: Path
) -> None:
    config = _scrape_config(trainbus, tmp_path)
    with (
        run_prometheus(prometheus_binary, config, tmp_path) as prometheus,
        TrainbusClient(trainbus.url, trainbus.token) as client,
    ):
        prometheus.wait_for("trainbus up", lambda: prometheus.value('up{job="trainbus"}') == 1)
        (target,) = prometheus.api("targets")["activeTargets"]
        assert target["health"] == "up", target  # the bearer token from the credentials file

        job_id = client.submit(JOB)["id"]
        started = time.time()
        _wait_for_state(client, job_id, "running")
        client.pause(job_id)
        _wait_for_state(client, job_id, "paused")
        step = f'trainbus_job_step{{job_id="{job_id}"}}'

        def paused_step() -> float | None:
            if prometheus.value('trainbus_jobs{state="paused"}') != 1:
                return None
            return prometheus.value(step)

        paused_at = prometheus.wait_for("the job paused", lambda: _boxed(paused_step()))[0]

        client.resume(job_id)
        record = client.wait(job_id, timeout=90)
        assert record["state"] == "completed", record
        final = float(record["step"])
        assert final > paused_at
        prometheus.wait_for(
            "the job completed",
            lambda: (
                prometheus.value('trainbus_jobs{state="completed"}') == 1
                and prometheus.value('trainbus_jobs{state="running"}') == 0
                and prometheus.value('trainbus_jobs{state="paused"}') == 0
                and prometheus.value(step) == final
            ),
        )
        steps = _range(prometheus, step, started)
        assert steps == sorted(steps), "the step went backwards"
        assert steps[0] <= paused_at < final
        assert steps[-1] == final  # the range ends now, after the scrape that saw the final step

        samples = f'trainbus:job_samples:rate1m{{job_id="{job_id}"}}'
        prometheus.wait_for("samples/s", lambda: (prometheus.value(samples) or 0) > 0)
        prometheus.wait_for("every rule evaluated", lambda: _all_rules_healthy(prometheus))
        assert prometheus.query('ALERTS{alertstate="firing"}') == []


def _boxed(value: float | None) -> tuple[float] | None:
    """A step of 0 is an answer, not a reason to poll on."""
    return None if value is None else (value,)


def _range(prometheus: PrometheusServer, expression: str, start: float) -> list[float]:
    """The expression every 0.5 s from before `start` up to and including the present moment.

    Prometheus evaluates a range query at start, start + step, ...: the start is placed a whole
    number of steps before the end so that the last point is evaluated at the end itself.
    """
    end_ms = int(time.time() * 1000)  # Prometheus works in whole milliseconds
    first_ms = end_ms - 500 * math.ceil((end_ms - start * 1000 + 1000) / 500)
    response = httpx.get(
        f"{prometheus.url}/api/v1/query_range",
        params={
            "query": expression,
            "start": f"{first_ms / 1000:.3f}",
            "end": f"{end_ms / 1000:.3f}",
            "step": "0.5",
        },
        timeout=10,
    )
    response.raise_for_status()
    (series,) = response.json()["data"]["result"]
    return [float(value) for _, value in series["values"]]


def _all_rules_healthy(prometheus: PrometheusServer) -> bool:
    rules = [rule for group in prometheus.api("rules")["groups"] for rule in group["rules"]]
    unhealthy = [r for r in rules if r["health"] != "ok"]
    assert not [r for r in unhealthy if r["health"] == "err"], unhealthy
    return bool(rules) and not unhealthy
