"""A real uvicorn server on a free loopback port, in a thread with its own event loop."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from tests.conftest import free_port
from trainbus.api import Settings, uvicorn_config
from trainbus.api._server import TrainbusServer
from trainbus.api._services import Services


@dataclass
class LiveServer:
    url: str
    ws_url: str
    token: str
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    @property
    def services(self) -> Services:
        services = self.app.state.services
        assert services is not None
        return services

    def call_soon(self, function: Any, *args: Any) -> None:
        """Run ``function`` on the server's event loop (where the bus and hub live)."""
        loop = self.server_loop
        loop.call_soon_threadsafe(function, *args)

    server_loop: Any = None


@contextmanager
def run_server(
    app: FastAPI,
    settings: Settings,
    *,
    deadline: float = 30.0,
    sockets: Callable[[uvicorn.Config], list[socket.socket]] | None = None,
) -> Iterator[LiveServer]:
    """Serve ``app`` until the block ends; waits for /healthz, never a fixed sleep.

    :param sockets: makes the listening sockets (default: uvicorn binds its own).
    """
    assert settings.token is not None
    config = uvicorn_config(app, settings)
    config.log_level = "warning"
    server = TrainbusServer(config)
    listening = None if sockets is None else sockets(config)
    holder: dict[str, Any] = {}

    def target() -> None:
        import asyncio

        async def main() -> None:
            holder["loop"] = asyncio.get_running_loop()
            await server.serve(sockets=listening)

        asyncio.run(main())

    thread = threading.Thread(target=target, name="uvicorn", daemon=True)
    thread.start()
    url = f"http://{settings.host}:{settings.port}"
    live = LiveServer(
        url=url,
        ws_url=url.replace("http://", "ws://"),
        token=settings.token.get_secret_value(),
        app=app,
        server=server,
        thread=thread,
    )
    stop_at = time.monotonic() + deadline
    while True:
        if not thread.is_alive():
            raise RuntimeError("the server thread died during start-up")
        try:
            if httpx.get(url + "/healthz", timeout=1.0).status_code == 200 and server.started:
                break
        except httpx.TransportError:
            pass
        if time.monotonic() > stop_at:
            raise TimeoutError("the server did not answer /healthz in time")
        time.sleep(0.02)  # polling interval while waiting for readiness, bounded by deadline
    live.server_loop = holder["loop"]
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        assert not thread.is_alive(), "the server did not shut down"


def make_settings(data_dir: Any, **overrides: Any) -> Settings:
    return Settings(
        host="127.0.0.1",
        port=free_port(),
        data_dir=data_dir,
        token="test-token-0123456789",
        ws_ping_interval=5.0,
        **overrides,
    )
