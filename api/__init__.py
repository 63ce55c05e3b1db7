"""The trainbus service: the FastAPI app (REST, WebSocket streaming, auth), its settings, and
the Python clients. The CLI lives in :mod:`trainbus.api.cli` (``trainbus``).

The clients import only httpx and websockets: the server's names (``create_app``,
``Settings``, ...) are loaded on first use, so a script that only submits and watches jobs
never imports FastAPI or torch.
"""

from __future__ import annotations

import importlib
import typing

from .client import AsyncTrainbusClient as AsyncTrainbusClient
from .client import ClientError as ClientError
from .client import HTTPStatusError as HTTPStatusError
from .client import StreamClosed as StreamClosed
from .client import TrainbusClient as TrainbusClient

if typing.TYPE_CHECKING:
    from ._app import Runtime as Runtime
    from ._app import RuntimeFactory as RuntimeFactory
    from ._app import create_app as create_app
    from ._server import serve as serve
    from ._server import uvicorn_config as uvicorn_config
    from ._settings import Settings as Settings
    from ._websocket import CLOSE_TOO_SLOW as CLOSE_TOO_SLOW

__all__ = [
    "CLOSE_TOO_SLOW",
    "AsyncTrainbusClient",
    "ClientError",
    "HTTPStatusError",
    "Runtime",
    "RuntimeFactory",
    "Settings",
    "StreamClosed",
    "TrainbusClient",
    "create_app",
    "serve",
    "uvicorn_config",
]

# The server side's public names and the module of each, imported when first asked for.
_SERVER_SIDE = {
    "CLOSE_TOO_SLOW": "._websocket",
    "Runtime": "._app",
    "RuntimeFactory": "._app",
    "Settings": "._settings",
    "create_app": "._app",
    "serve": "._server",
    "uvicorn_config": "._server",
}


def __getattr__(name: str) -> typing.Any:
    module = _SERVER_SIDE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value
