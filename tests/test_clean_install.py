"""What users install is what is tested: the package without dev extras, in a venv of its own.

A dev venv hides undeclared dependencies (a module that the dev extras happen to pull in). This
test builds the wheel, installs it the way a user does (``--constraint constraints.txt``, no
extras) into a fresh venv, checks that it installs one top-level name, imports every module it
ships, then runs ``trainbus serve`` from that venv, trains a job to completion through the API
and scrapes ``/metrics``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import venv
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from trainbus.api import TrainbusClient

from .conftest import free_port

ROOT = Path(__file__).parents[1]
TOKEN = "clean-install-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

# Every module the installed distribution ships, imported one by one in the fresh venv.
IMPORT_ALL = """
import importlib, importlib.metadata as metadata
names = sorted(
    str(f).removesuffix(".py").replace("/", ".").removesuffix(".__init__")
    for f in metadata.distribution("trainbus").files or ()
    if str(f).endswith(".py") and ".dist-info" not in str(f) and not str(f).startswith("..")
)
assert names, "the distribution lists no modules"
# integrations load their library, which comes with its extra (trainbus[lightning])
OPTIONAL = {"trainbus.sdk.lightning": "lightning", "trainbus.sdk.huggingface": "transformers"}
for name in names:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as missing:
        if OPTIONAL.get(name) != (missing.name or "").split(".")[0]:
            raise
print(len(names))
"""


def _copy_source(destination: Path) -> Path:
    """The tracked source tree, without build leftovers of the dev checkout."""
    ignore = shutil.ignore_patterns(
        ".git", ".venv*", "*.egg-info", "build", "__pycache__", ".mypy_cache", ".ruff_cache", "data"
    )
    return Path(shutil.copytree(ROOT, destination, ignore=ignore))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("wheel")
    source = _copy_source(base / "source")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
         "--no-deps", "--wheel-dir", str(base / "dist"), str(source)],
        check=True,
        cwd=base,
        timeout=300,
    )
    (built,) = (base / "dist").glob("trainbus-*.whl")
    return built


def _clean_environment() -> dict[str, str]:
    """The environment of a process of the clean venv: nothing from the dev checkout, and the
    venv's modules byte-compiled by the first process that imports them, once for the later
    ones (pip installs with ``--no-compile``)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("TRAINBUS_")}
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@pytest.fixture(scope="module")
def clean_venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    environment = tmp_path_factory.mktemp("clean-install") / "venv"
    venv.EnvBuilder(with_pip=False, clear=True).create(environment)
    python = environment / "bin" / "python"
    # pip installs into the fresh venv's interpreter (--python) without being installed there
    # itself; --no-compile leaves byte-compiling to the first import of each module (torch
    # alone ships thousands that no test imports).
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--disable-pip-version-check", "--no-compile",
         "--constraint", str(ROOT / "constraints.txt"), str(wheel)],
        check=True,
        cwd=environment,
        timeout=480,
    )
    return environment


def test_the_wheel_installs_one_top_level_name(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {name for name in top_level if not name.endswith(".dist-info")} == {"trainbus"}
    for package in ("bus", "worker", "subscribers", "api"):
        assert f"trainbus/{package}/__init__.py" in names
    assert "trainbus/api/dashboard/index.html" in names  # package data travels too


@pytest.fixture
def served(clean_venv: Path, tmp_path: Path) -> Iterator[str]:
    port = free_port()
    env = _clean_environment()
    env["TRAINBUS_TOKEN"] = TOKEN
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [str(clean_venv / "bin" / "trainbus"), "serve", "--port", str(port),
         "--data-dir", str(tmp_path / "data")],
        cwd=tmp_path,  # not the checkout: nothing may be imported from the source tree
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"trainbus serve exited: {log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/readyz", headers=AUTH, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"not ready in 60 s: {log_path.read_text()[-3000:]}"
            time.sleep(0.1)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


@pytest.mark.timeout(600)
def test_every_shipped_module_imports_without_dev_extras(clean_venv: Path) -> None:
    python = clean_venv / "bin" / "python"
    assert subprocess.run(
        [str(python), "-c", "import pytest"], capture_output=True, cwd="/"
    ).returncode != 0, "the clean venv must not hold the dev extras"
    result = subprocess.run(
        [str(python), "-c", IMPORT_ALL],
        capture_output=True,
        text=True,
        cwd="/",
        env=_clean_environment(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) > 20


@pytest.mark.timeout(600)
def test_the_clean_install_serves_a_job_to_completion(served: str) -> None:
    with TrainbusClient(served, TOKEN) as client:
        spec = {
            "name": "clean-install",
            "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
            "dataset": {"name": "digits"},
            "epochs": 2,
            "batch_size": 64,
            "seed": 0,
        }
        job_id = client.submit(spec)["id"]
        record = client.wait(job_id, timeout=120)
        assert record["state"] == "completed", record
        assert f'trainbus_job_step{{job_id="{job_id}"}}' in client.metrics()
        assert client.checkpoints(job_id), "no checkpoint was written"

