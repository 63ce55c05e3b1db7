"""docker-compose.yml and the Dockerfile agree with the app's settings and the files shipped."""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import pytest

from trainbus.api import Settings

from .compose_files import (
    bind_mounts,
    host_path,
    interpolate,
    named_volumes,
    referenced_variables,
)
from .conftest import DEPLOY, REPO, load_yaml

TRAINBUS_SERVICES = ("trainbus", "trainbus-gpu")
TOKEN = "compose-test-token-0123"
DOCKERFILE = (REPO / "Dockerfile").read_text()


def _dockerfile_env() -> dict[str, str]:
    joined = DOCKERFILE.replace("\\\n", " ")
    environment: dict[str, str] = {}
    for line in joined.splitlines():
        if line.startswith("ENV "):
            environment.update(re.findall(r"(\w+)=(\S+)", line))
    return environment


def _published(port: str) -> tuple[str, int, int]:
    host, published, container = (
        port.rsplit(":", 2) if port.count(":") >= 2 else ("", *port.split(":"))
    )
    return host, int(published), int(container)


def test_the_services_are_there(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"trainbus", "prometheus", "grafana", "trainbus-gpu"} <= set(services)
    assert "profiles" not in services["trainbus"]
    assert services["trainbus-gpu"]["profiles"] == ["gpu"]
    for name, service in services.items():
        assert service.get("image") or service.get("build"), name


def test_every_mounted_file_and_named_volume_exists(compose: dict[str, Any]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    declared_secrets = set(compose.get("secrets") or {})
    for name, service in compose["services"].items():
        for target, source in bind_mounts(service, REPO).items():
            assert source.exists(), f"{name} mounts {source} (at {target}), which is missing"
            assert REPO in source.parents, f"{name} mounts {source} from outside the repository"
        for target, volume in named_volumes(service).items():
            assert volume in declared_volumes, (
                f"{name} mounts undeclared volume {volume} at {target}"
            )
        for secret in service.get("secrets", []):
            assert secret in declared_secrets, f"{name} uses undeclared secret {secret}"
        build = service.get("build")
        if build is not None:
            context = REPO / (build if isinstance(build, str) else build.get("context", "."))
            assert (context / "Dockerfile").is_file(), name


def test_every_trainbus_variable_is_a_settings_field(compose: dict[str, Any]) -> None:
    text = (REPO / "docker-compose.yml").read_text()
    used = {name for name in referenced_variables(text) if name.startswith("TRAINBUS_")}
    for service in TRAINBUS_SERVICES:
        used |= set(compose["services"][service]["environment"])
    used |= set(_dockerfile_env())
    fields = set(Settings.model_fields)
    unknown = {
        name for name in used if name.startswith("TRAINBUS_") and name[9:].lower() not in fields
    }
    assert not unknown, f"not settings of api.Settings: {sorted(unknown)}"
    assert {"TRAINBUS_TOKEN", "TRAINBUS_PORT", "TRAINBUS_DATA_DIR"} <= used


@pytest.mark.parametrize("name", TRAINBUS_SERVICES)
def test_the_service_environment_makes_valid_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = compose["services"][name]
    with pytest.raises(KeyError, match="TRAINBUS_TOKEN"):  # the token must come from outside
        interpolate(service["environment"]["TRAINBUS_TOKEN"], {})
    import os

    for variable in [key for key in os.environ if key.startswith("TRAINBUS_")]:
        monkeypatch.delenv(variable)
    outside = {"TRAINBUS_TOKEN": TOKEN}
    for key, value in {**_dockerfile_env(), **service["environment"]}.items():
        if key.startswith("TRAINBUS_"):
            monkeypatch.setenv(key, interpolate(str(value), outside))
    settings = Settings()

    assert settings.token is not None
    assert settings.token.get_secret_value() == TOKEN
    assert not settings.loopback_only  # reachable from Prometheus on the compose network
    assert settings.metrics_require_token
    assert PurePosixPath(str(settings.data_dir)) in named_volumes(service)
    ports = [_published(port) for port in service["ports"]]
    assert [container for _, _, container in ports] == [settings.port]
    assert all(host == "127.0.0.1" for host, _, _ in ports), ports
    assert f"EXPOSE {settings.port}" in DOCKERFILE
    assert re.search(r"VOLUME \[\"" + re.escape(str(settings.data_dir)) + r"\"\]", DOCKERFILE)


def test_every_published_port_is_on_loopback(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            host, _, _ = _published(str(port))
            assert host == "127.0.0.1", f"{name} publishes {port} beyond this machine"


def test_the_gpu_profile_reserves_nvidia_devices_and_stands_in_for_trainbus(
    compose: dict[str, Any],
) -> None:
    cpu, gpu = compose["services"]["trainbus"], compose["services"]["trainbus-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices
    assert "deploy" not in cpu
    assert "download.pytorch.org/whl/cu" in gpu["build"]["args"]["TORCH_INDEX"]
    assert gpu["image"] != cpu["image"]
    assert "trainbus" in gpu["networks"]["default"]["aliases"]  # Prometheus' target
    assert gpu["ports"] == cpu["ports"]
    assert gpu["volumes"] == cpu["volumes"]


def test_dockerfile_runs_unprivileged_with_a_health_check() -> None:
    assert re.search(r"^USER (?!root)\w+", DOCKERFILE, re.MULTILINE)
    healthcheck = DOCKERFILE[DOCKERFILE.index("HEALTHCHECK") :]
    assert "/healthz" in healthcheck
    assert "TRAINBUS_PORT" in healthcheck


def test_prometheus_scrapes_trainbus_with_the_token(
    compose: dict[str, Any], prometheus_config: dict[str, Any]
) -> None:
    service = compose["services"]["prometheus"]
    mounts = bind_mounts(service, REPO)
    config_flag = next(arg for arg in service["command"] if arg.startswith("--config.file="))
    assert (
        host_path(mounts, config_flag.split("=", 1)[1]) == DEPLOY / "prometheus" / "prometheus.yml"
    )
    for rule_file in prometheus_config["rule_files"]:
        mounted = host_path(mounts, rule_file)
        assert mounted is not None and mounted.is_file(), rule_file

    (job,) = [j for j in prometheus_config["scrape_configs"] if j["job_name"] == "trainbus"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    trainbus = compose["services"]["trainbus"]
    names = {"trainbus", *compose["services"]["trainbus-gpu"]["networks"]["default"]["aliases"]}
    for target in job["static_configs"][0]["targets"]:
        host, port = target.rsplit(":", 1)
        assert host in names
        assert int(port) == int(trainbus["environment"]["TRAINBUS_PORT"])

    credentials = PurePosixPath(job["authorization"]["credentials_file"])
    assert job["authorization"].get("type", "Bearer") == "Bearer"
    assert credentials.parent == PurePosixPath("/run/secrets")
    assert credentials.name in service["secrets"]
    assert compose["secrets"][credentials.name] == {"environment": "TRAINBUS_TOKEN"}


def test_grafana_is_provisioned_from_the_mounted_files(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    service = compose["services"]["grafana"]
    mounts = bind_mounts(service, REPO)
    provisioning = host_path(mounts, "/etc/grafana/provisioning")
    assert provisioning == DEPLOY / "grafana" / "provisioning"

    sources = [
        source
        for path in sorted((provisioning / "datasources").glob("*.yml"))
        for source in load_yaml(path)["datasources"]
    ]
    (prometheus,) = [s for s in sources if s["type"] == "prometheus"]
    url = urlsplit(prometheus["url"])
    assert url.hostname in compose["services"]
    assert url.port == 9090  # Prometheus' default listen port; compose does not change it
    assert not any(
        "web.listen-address" in arg for arg in compose["services"]["prometheus"]["command"]
    )

    providers = [
        provider
        for path in sorted((provisioning / "dashboards").glob("*.yml"))
        for provider in load_yaml(path)["providers"]
    ]
    folders = [host_path(mounts, p["options"]["path"]) for p in providers]
    assert DEPLOY / "grafana" / "dashboards" in folders
    home = host_path(mounts, service["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file()

    # Panels follow a data source variable (so the JSON also imports into another Grafana);
    # it starts on the default data source, which the provisioned Prometheus is.
    assert prometheus["isDefault"] is True
    (variable,) = [v for v in dashboard["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    uids |= {
        target["datasource"]["uid"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    }
    assert uids == {"${" + variable["name"] + "}"}
