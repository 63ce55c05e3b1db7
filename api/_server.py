"""Running the app under uvicorn with the settings' host, port, keep-alive and log level."""

from __future__ import annotations

import contextlib
import gc
import importlib
import socket
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from trainbus.sdk import MAX_MESSAGE_BYTES as MAX_WORKER_MESSAGE_BYTES

from ._access_log import install_redactor
from ._app import create_app
from ._auth import WORKER_PATH, announce_generated_token, ensure_token, write_token_file
from ._connections import ConnectionGuard, ReservingListener, guarded_protocol
from ._local import bound_url, token_file, write_server_url
from ._settings import Settings
from ._websocket import MAX_CLIENT_MESSAGE_BYTES

__all__ = [
    "TrainbusServer",
    "WebSocketProtocol",
    "bind_then_write_token",
    "freeze_heap",
    "listening_socket",
    "serve",
    "uvicorn_config",
]

KEEP_ALIVE_SECONDS = 75  # nginx's default
PRELOADED = ("torch._dynamo",)
"""Modules the server imports lazily (a job's memory estimate at its submission, like the first
optimizer a process builds, imports torch._dynamo: ~120,000 objects), imported before the heap
is frozen so that they are frozen too."""
PRELOADED_FOR_JOBS = ("sklearn.datasets",)
"""Modules a job imports lazily (the bundled datasets load through sklearn.datasets, ~60,000
objects), imported with :data:`PRELOADED` where jobs train on the server's own threads
(``run_jobs_in`` = thread). A server whose jobs run in worker processes never imports them (its
fork server does): they would cost each of its starts a second of CPU."""


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, except that a connection the app is done with is
    dropped (``transport.abort``) if it is still open :attr:`drop_after` seconds later.

    uvicorn ends a connection with ``transport.close()``, which waits for what is buffered to
    be written first. A client that never reads never takes it: its send buffers stay full, the
    close frame never goes out and the connection (socket, buffers) stayed open for as long as
    the client kept it, however long after the app had closed it 4008. With this, a
    never-reading client's connection is gone at most ``ws_close_timeout`` (the app's wait to
    queue the close frame) plus :attr:`drop_after` after it was marked too slow; the client
    sees the connection dropped (1006), not the 4008 it did not read. A connection whose
    keep-alive ping goes unanswered is dropped the same way.
    """

    drop_after: float = 5.0

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set once the handshake was accepted
        if scope is not None and WORKER_PATH.match(scope["path"]):
            # a job's worker sends its events in batches: the streams' bound would refuse them
            self.conn.max_message_size = MAX_WORKER_MESSAGE_BYTES
            if self.conn.max_fragment_size is not None:
                self.conn.max_fragment_size = MAX_WORKER_MESSAGE_BYTES

    def keepalive_timeout(self) -> None:
        # uvicorn closes a connection whose pong is late with ``transport.close()``, which
        # waits for the buffered data a client that never reads never takes: drop it instead
        super().keepalive_timeout()
        if not self.disconnected:
            self.transport.abort()

    async def run_asgi(self) -> None:
        await super().run_asgi()
        if not self.disconnected:
            self.loop.call_later(self.drop_after, self._drop_if_open)

    def _drop_if_open(self) -> None:
        if not self.disconnected:
            self.transport.abort()


class TrainbusServer(uvicorn.Server):
    """uvicorn's server, except that a shutdown first lets the running jobs save and end as
    interrupted while their workers are still connected (uvicorn closes every WebSocket before
    the app's own shutdown: the workers' last events and results would be cut off)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        app = self.config.app
        drain = getattr(getattr(app, "state", None), "drain_jobs", None)
        if drain is not None:
            await drain()
        await super().shutdown(sockets)


def uvicorn_config(app: FastAPI, settings: Settings) -> uvicorn.Config:
    """The uvicorn configuration for ``app`` (WebSocket pings, bounds on connections that send
    no request, no token in access logs); the connection bounds are ``app.state.connections``."""
    guard = ConnectionGuard(
        request_timeout=settings.request_timeout,
        reserved_file_descriptors=settings.reserved_file_descriptors,
    )
    app.state.connections = guard
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http=guarded_protocol(guard),
        ws=type(
            "WebSocketProtocol", (WebSocketProtocol,), {"drop_after": settings.ws_close_timeout}
        ),
        ws_ping_interval=settings.ws_ping_interval,
        ws_ping_timeout=settings.ws_ping_timeout,
        lifespan="on",
        # Idle connections stay open longer than clients keep them pooled (httpx, our client
        # included: 5 s; aiohttp: 15 s), else a request sent on one as the server closes it
        # fails (uvicorn's default is 5 s: RemoteProtocolError/ReadError under load).
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=max(1, round(settings.shutdown_timeout)),
        server_header=False,
        # one encoding per event for every client: per-client compression would undo that
        ws_per_message_deflate=False,
        ws_max_size=MAX_CLIENT_MESSAGE_BYTES,  # the streams take no client messages (1009)
    )
    # after Config: its logging set-up is done, and a filter on the logger survives a later one
    install_redactor(() if settings.token is None else (settings.token.get_secret_value(),))
    return config


def listening_socket(config: uvicorn.Config, settings: Settings) -> socket.socket:
    """The server's bound socket, its connections' kernel send buffer capped, and connections
    that would use the reserved file descriptors closed at accept.

    Linux grows a loopback connection's send buffer to 4 MiB on its own: a WebSocket client
    that never reads would hold that much kernel memory and keep the server encoding and
    writing for it for thousands of events before a send ever blocked. With the cap, its
    sends block after ``socket_send_buffer_bytes`` (accepted connections inherit the
    listening socket's buffer size), its buffer fills and it is closed 4008 for lagging.
    """
    sock = config.bind_socket()
    if settings.socket_send_buffer_bytes is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, settings.socket_send_buffer_bytes)
    guard = config.app.state.connections if isinstance(config.app, FastAPI) else None
    if isinstance(guard, ConnectionGuard):
        return ReservingListener.wrap(sock, guard)
    return sock


def bind_then_write_token(
    config: uvicorn.Config, settings: Settings, *, generated: bool
) -> socket.socket:
    """The :func:`listening_socket`, and only once it is bound, for a ``generated`` token,
    the token file (:func:`write_token_file`).

    A second server started on a busy port exits here (uvicorn raises ``SystemExit``) before
    it could overwrite the token file of the server that holds the port.

    :raises SystemExit: if the address cannot be bound (nothing is written).
    :raises TokenFileRefused: if the token file cannot be written safely (the socket is closed).
    """
    sock = listening_socket(config, settings)
    if generated and settings.token is not None:
        try:
            write_token_file(settings.data_dir, settings.token)
        except BaseException:
            sock.close()
            raise
    return sock


def freeze_heap(settings: Settings) -> None:
    """Move every object alive now (the service's modules: torch, numpy, pydantic, FastAPI,
    some 330,000 objects) out of the cyclic garbage collector's reach (``gc.freeze``).

    They live as long as the process, yet every full collection walked them all: 130-210 ms
    with the GIL held, so the training thread stood still too. Connections allocate enough
    for a full collection every few hundred WebSocket handshakes, so a flood of them cost a
    running job whole epochs' worth of pauses (and a third of the server's CPU per handshake).
    With the heap frozen a full collection walks only what was allocated since.
    """
    jobs = PRELOADED_FOR_JOBS if settings.run_jobs_in == "thread" else ()
    for name in (*PRELOADED, *jobs):
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # The young generations only: a full collection here found nothing to free and cost a
    # start-up (a restart after a crash) 150 ms.
    gc.collect(1)
    gc.freeze()


def serve(settings: Settings) -> None:
    """Run the service until SIGINT/SIGTERM (then shut down gracefully). A generated token is
    written to the data folder once the port is bound.

    :raises ValueError: for a non-loopback host without an explicit token.
    :raises TokenFileRefused: if the generated token cannot be written safely.
    """
    settings, generated = ensure_token(settings)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    server = TrainbusServer(config)
    # the port and the token file first: a server that cannot serve says so at once
    sock = bind_then_write_token(config, settings, generated=generated)
    freeze_heap(settings)
    write_server_url(settings.data_dir, bound_url(sock))  # where local CLI commands look
    if generated and settings.token is not None:
        announce_generated_token(token_file(settings.data_dir))
    server.run(sockets=[sock])
    if server.started is False:
        raise SystemExit(1)
