"""The Grafana dashboard is valid, its PromQL parses, and it shows what the issue asks for
with metrics the real exporter exposes."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .conftest import DEPLOY
from .promql import grafana_queries, metric_names, without_grafana_variables


def test_the_dashboard_is_valid_json_with_unique_panel_ids(dashboard: dict[str, Any]) -> None:
    text = (DEPLOY / "grafana" / "dashboards" / "trainbus.json").read_text()
    assert json.loads(text) == dashboard
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]


def test_the_dashboard_shows_what_operators_need(dashboard: dict[str, Any]) -> None:
    queries = " ".join(expression for _, expression in grafana_queries(dashboard))
    for metric in [
        "trainbus_job_train_loss",
        "trainbus_job_validation_metric",
        "trainbus:job_samples:rate1m",
        "trainbus_jobs",
        "trainbus_gpu_utilization_ratio",
        "trainbus_gpu_memory_used_bytes",
        "trainbus_subscriber_buffered_events",
        "trainbus_subscriber_dropped_events_total",
        "trainbus_subscriber_publisher_wait_seconds_total",
        "trainbus_checkpoint_write_seconds_bucket",
    ]:
        assert metric in queries, metric


def test_every_query_parses(dashboard: dict[str, Any], promtool: str, tmp_path: Path) -> None:
    """promtool parses each query (Grafana's variables filled in) as a recording rule."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": without_grafana_variables(expression)}
        for index, (_, expression) in enumerate(grafana_queries(dashboard))
    ]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_query_names_an_exposed_metric_or_a_recording_rule(
    dashboard: dict[str, Any], rules: dict[str, Any], exposed_metrics: set[str]
) -> None:
    recorded = {
        rule["record"] for group in rules["groups"] for rule in group["rules"] if "record" in rule
    }
    for where, expression in grafana_queries(dashboard):
        names = metric_names(without_grafana_variables(expression))
        assert names, f"{where}: {expression} names no metric"
        unknown = names - exposed_metrics - recorded
        assert not unknown, f"{where} queries {sorted(unknown)}, which trainbus does not expose"
