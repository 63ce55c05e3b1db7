"""The shipped Prometheus configuration and rules pass promtool, their unit tests pass, and
they only name metrics the real exporter exposes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from .compose_files import bind_mounts, host_path
from .conftest import DEPLOY, REPO
from .promql import metric_names

RULES = DEPLOY / "prometheus" / "rules.yml"


def _promtool(promtool: str, *arguments: str | Path, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [promtool, *map(str, arguments)], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    return output


def test_promtool_checks_the_config_as_the_container_sees_it(
    promtool: str, compose: dict[str, Any], prometheus_config: dict[str, Any], tmp_path: Path
) -> None:
    """Container paths are mapped back through the compose file's mounts and secrets, so a
    file the compose file forgets to mount fails here."""
    service = compose["services"]["prometheus"]
    mounts = bind_mounts(service, REPO)
    token = tmp_path / "trainbus_token"
    token.write_text("compose-test-token-0123")
    secrets = {f"/run/secrets/{name}": token for name in service["secrets"]}
    config = dict(prometheus_config)
    config["rule_files"] = [str(host_path(mounts, path)) for path in config["rule_files"]]
    for job in config["scrape_configs"]:
        authorization = job.get("authorization", {})
        if "credentials_file" in authorization:
            authorization["credentials_file"] = str(secrets[authorization["credentials_file"]])
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))

    output = _promtool(promtool, "check", "config", path)
    assert "SUCCESS" in output and "rules found" in output, output


def test_promtool_checks_the_rules(promtool: str) -> None:
    output = _promtool(promtool, "check", "rules", RULES)
    assert "SUCCESS" in output


def test_the_rules_unit_tests_pass(promtool: str) -> None:
    """rules.test.yml drives every alert through firing and not firing."""
    output = _promtool(promtool, "test", "rules", "rules.test.yml", cwd=RULES.parent)
    assert "SUCCESS" in output
    tests = yaml.safe_load((RULES.parent / "rules.test.yml").read_text())
    tested = {
        case["alertname"] for test in tests["tests"] for case in test.get("alert_rule_test", [])
    }
    assert tested == {rule["alert"] for rule in _rules(_load_rules()) if "alert" in rule}


def test_the_required_alerts_and_throughput_rules_exist() -> None:
    rules = _rules(_load_rules())
    alerts = {rule["alert"]: rule for rule in rules if "alert" in rule}
    assert {
        "TrainbusJobFailed",
        "TrainbusJobStalled",
        "TrainbusGPUMemoryHigh",
        "TrainbusEventsDropped",
    } <= set(alerts)
    assert "10m" in alerts["TrainbusJobStalled"]["expr"]
    assert "0.95" in alerts["TrainbusGPUMemoryHigh"]["expr"]
    recorded = {rule["record"]: rule["expr"] for rule in rules if "record" in rule}
    assert "trainbus_job_samples_total" in recorded["trainbus:job_samples:rate1m"]
    for alert in alerts.values():
        assert alert["labels"]["severity"] in ("warning", "critical")
        assert alert["annotations"]["summary"]


def test_rules_and_their_tests_name_only_exposed_metrics(exposed_metrics: set[str]) -> None:
    rules = _rules(_load_rules())
    recorded = {rule["record"] for rule in rules if "record" in rule}
    for rule in rules:
        unknown = metric_names(rule["expr"]) - exposed_metrics - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')} names {unknown}"
    tests = yaml.safe_load((RULES.parent / "rules.test.yml").read_text())
    for test in tests["tests"]:
        for series in test["input_series"]:
            name = re.match(r"[\w:]+", series["series"])
            assert name is not None and name.group() in exposed_metrics, series["series"]


def _load_rules() -> dict[str, Any]:
    document = yaml.safe_load(RULES.read_text())
    assert isinstance(document, dict)
    return document


def _rules(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [rule for group in document["groups"] for rule in group["rules"]]
