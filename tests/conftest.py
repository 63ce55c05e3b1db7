"""Fixtures shared by the whole suite."""

from __future__ import annotations

import socket
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


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
