"""Fixtures shared by the whole suite."""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """The service runs on asyncio (uvicorn); the bus tests add trio in their conftest."""
    return "asyncio"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh trainbus data folder."""
    path = tmp_path / "data"
    path.mkdir()
    return path


def serve_command(port: int, data_dir: Path, token: str) -> list[str]:
    """The command line of a real ``trainbus serve`` on ``port`` (warnings only in its log)."""
    return [
        sys.executable, "-m", "trainbus.api.cli", "--token", token, "serve",
        "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning",
    ]  # fmt: skip


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session", autouse=True)
def _one_copy_of_each_package() -> Iterator[None]:
    """The source tree's folders are importable by their bare names from the repository root;
    code that reaches one (a string naming ``api`` instead of ``trainbus.api``) would run a
    second copy of it, and break once installed. Fail the run if anything did."""
    yield
    packages = ("bus", "sdk", "worker", "subscribers", "api")
    bare = sorted(name for name in packages if name in sys.modules)
    assert not bare, f"imported by the bare name, not through trainbus: {bare}"
