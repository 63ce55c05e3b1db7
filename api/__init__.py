"""The trainbus service: the FastAPI app (REST, WebSocket streaming, auth), its settings, and
the Python clients. The CLI lives in :mod:`api.cli` (``trainbus``)."""

from __future__ import annotations

from ._app import Runtime as Runtime
from ._app import RuntimeFactory as RuntimeFactory
from ._app import create_app as create_app
from ._server import serve as serve
from ._server import uvicorn_config as uvicorn_config
from ._settings import Settings as Settings
from ._websocket import CLOSE_TOO_SLOW as CLOSE_TOO_SLOW
from .client import AsyncTrainbusClient as AsyncTrainbusClient
from .client import StreamClosed as StreamClosed
from .client import TrainbusClient as TrainbusClient
from .client import TrainbusError as TrainbusError

__all__ = [
    "CLOSE_TOO_SLOW",
    "AsyncTrainbusClient",
    "Runtime",
    "RuntimeFactory",
    "Settings",
    "StreamClosed",
    "TrainbusClient",
    "TrainbusError",
    "create_app",
    "serve",
    "uvicorn_config",
]
