"""WebSocket clients during a replay of stored events: one that never reads is let go within
its bound, one that closes cleanly costs a log line at most, and a never-reading live client
is let go within its bound while many others are connected."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from tests.api.server import LiveServer, run_server
from tests.conftest import free_port
from trainbus.api import Settings, create_app
from trainbus.api._server import WebSocketProtocol, listening_socket
from trainbus.bus import EventType

from .conftest import poll, record

JOB = "replayed-job"
EVENTS = 20_000
SEND_TIMEOUT = 1.0
CLOSE_TIMEOUT = 1.0
PING_INTERVAL = 2.0
PING_TIMEOUT = 2.0
BOUND = SEND_TIMEOUT + 2 * CLOSE_TIMEOUT + 5.0
"""How long a never-reading client may stay connected: the send it does not take, the close
frame it does not take, the drop that follows, and slack for a loaded machine."""


@dataclass
class Replayed:
    server: LiveServer
    logged: list[logging.LogRecord]

    def connections(self) -> int:
        """The server's open WebSocket connections."""
        return sum(
            isinstance(c, WebSocketProtocol)
            for c in list(self.server.server.server_state.connections)
        )


class _Keep(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__()
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@contextmanager
def _serve(settings: Settings) -> Iterator[LiveServer]:
    """:func:`run_server`, on the socket ``trainbus serve`` listens on (its send buffer capped,
    as in production: without the cap the kernel takes a whole replay and no send blocks)."""
    app = create_app(settings)
    with run_server(
        app, settings, sockets=lambda config: [listening_socket(config, settings)]
    ) as server:
        yield server


@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replayed]:
    """A server whose store holds :data:`EVENTS` events of a stopped job."""
    settings = Settings(
        host="127.0.0.1",
        port=free_port(),
        data_dir=tmp_path_factory.mktemp("replay") / "data",
        token="test-token-0123456789",
        resource_interval_seconds=60.0,
        ws_send_timeout=SEND_TIMEOUT,
        ws_close_timeout=CLOSE_TIMEOUT,
        ws_ping_interval=PING_INTERVAL,
        ws_ping_timeout=PING_TIMEOUT,
    )
    logged: list[logging.LogRecord] = []
    keeper = _Keep(logged)
    keeper.setLevel(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "trainbus.api")]
    with _serve(settings) as server:
        # after start-up: uvicorn's logging set-up removes the handlers of its loggers
        for logger in loggers:
            logger.addHandler(keeper)
        try:
            bus = server.services.bus
            for step in range(EVENTS):
                bus.publish(JOB, EventType.TRAIN_BATCH_END, {"step": step, "loss": 0.5})
            last = f"{server.url}/jobs/{JOB}/events?after_seq={EVENTS - 1}"
            poll(
                lambda: httpx.get(last, headers=server.headers).json(),
                "the store to hold every event",
                interval=0.05,
            )
            yield Replayed(server, logged)
        finally:
            for logger in loggers:
                logger.removeHandler(keeper)


def _never_reading_client(server: LiveServer, path: str) -> socket.socket:
    """A WebSocket handshake over a socket with a 4 KiB receive buffer that is never read."""
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    sock.sendall(
        (
            f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {server.token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # one byte at a time: nothing past the handshake is read
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def test_clients_that_never_read_a_replay_are_let_go_within_the_bound(
    replayed: Replayed,
) -> None:
    assert replayed.connections() == 0
    started = time.monotonic()
    clients = [
        _never_reading_client(replayed.server, f"/jobs/{JOB}/events/ws?after_seq=0")
        for _ in range(5)
    ]
    try:
        poll(lambda: replayed.connections() == len(clients), "the clients to join", timeout=10)
        poll(
            lambda: replayed.connections() == 0,
            "the server to let the never-reading replay clients go",
            timeout=BOUND,
            interval=0.05,
        )
        seconds = time.monotonic() - started
    finally:
        for client in clients:
            client.close()
    assert replayed.server.services.hub.statistics().clients == 0
    record("5 never-reading replay clients", clients=len(clients), let_go_after_s=round(seconds, 2))


async def test_a_clean_close_during_a_replay_logs_no_traceback(replayed: Replayed) -> None:
    replayed.logged.clear()
    url = f"{replayed.server.ws_url}/jobs/{JOB}/events/ws?after_seq=0"
    for attempt in range(10):
        async with connect(
            url, additional_headers=replayed.server.headers, max_size=None
        ) as websocket:
            if attempt % 2:
                with anyio.fail_after(10):
                    await websocket.recv()  # the replay has begun
        # leaving the block closes cleanly (1000) while the server is still replaying
    poll(lambda: replayed.server.services.hub.statistics().clients == 0, "the streams to end")
    poll(lambda: replayed.connections() == 0, "the connections to close")
    messages = [record.getMessage() for record in replayed.logged]
    assert not any("Exception in ASGI application" in message for message in messages), messages
    assert all(record.exc_info is None for record in replayed.logged), messages
    assert len(messages) <= 10, messages


def test_a_never_reading_client_whose_replay_fit_in_the_buffers_is_let_go_by_keepalive(
    replayed: Replayed,
) -> None:
    """Nothing left to send, so no send can time out: the unanswered keep-alive ping lets it
    go (uvicorn's own close would wait for the client to take what is buffered, forever)."""
    started = time.monotonic()
    client = _never_reading_client(
        replayed.server, f"/jobs/{JOB}/events/ws?after_seq={EVENTS - 200}"
    )
    try:
        poll(lambda: replayed.connections() == 1, "the client to join", timeout=10)
        poll(
            lambda: replayed.connections() == 0,
            "the server to let the client go",
            timeout=PING_INTERVAL + PING_TIMEOUT + 5.0,
            interval=0.05,
        )
    finally:
        client.close()
    record("5 never-reading idle client", let_go_after_s=round(time.monotonic() - started, 2))


async def test_a_never_reading_live_client_is_let_go_while_many_others_stream(
    replayed: Replayed,
) -> None:
    """Live events at 3,000 a second to 30 readers and one client that never reads: the
    stalled one is let go within its bound, and every reader gets every event."""
    job, events, readers = "live-job", 12_000, 30
    bus = replayed.server.services.bus
    bus.publish(job, EventType.JOB_QUEUED, {})
    first = bus.last_seq(job) + 1
    last = first + events - 1
    url = f"{replayed.server.ws_url}/jobs/{job}/events/ws?after_seq={first - 1}"
    too_slow_before = replayed.server.services.hub.statistics().too_slow
    got: list[int] = []

    async def read(websocket: ClientConnection) -> None:
        seen = 0
        while seen < last:
            message = json.loads(await websocket.recv())
            for event in message if isinstance(message, list) else [message]:
                seen = max(seen, event["seq"])
        got.append(seen)

    def publish() -> float:
        started = time.monotonic()
        for index in range(events):
            bus.publish(job, EventType.TRAIN_BATCH_END, {"step": index, "loss": 0.5})
            if index % 300 == 299:  # 3,000 events a second, in tenths of a second
                time.sleep(max(0.0, started + (index + 1) / 3000 - time.monotonic()))
        return time.monotonic()

    async with contextlib.AsyncExitStack() as stack:
        websockets = [
            await stack.enter_async_context(
                connect(url, additional_headers=replayed.server.headers, max_size=None)
            )
            for _ in range(readers)
        ]
        stalled = await anyio.to_thread.run_sync(
            _never_reading_client, replayed.server, url.removeprefix(replayed.server.ws_url)
        )
        stack.callback(stalled.close)
        with anyio.fail_after(120):
            async with anyio.create_task_group() as group:
                for websocket in websockets:
                    group.start_soon(read, websocket)
                published_at = await anyio.to_thread.run_sync(publish)
        # the readers have everything: the stalled client must be gone within its bound
        await anyio.to_thread.run_sync(
            lambda: poll(
                lambda: replayed.server.services.hub.statistics().too_slow > too_slow_before,
                "the stalled client to be let go",
                timeout=BOUND,
                interval=0.05,
            )
        )
        let_go_after = time.monotonic() - published_at
    assert got == [last] * readers
    record(
        "5 stalled live client",
        readers=readers,
        events=events,
        let_go_after_publishing_s=round(let_go_after, 2),
    )
