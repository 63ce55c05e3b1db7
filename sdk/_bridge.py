"""The worker's end of the worker protocol: a lossless subscriber of the worker's own bus that
carries the job's events to the server, and the commands the server sends back to the job's
control channel.

Flow control: at most :data:`WINDOW_EVENTS` events are in flight (sent, not acknowledged);
past that the subscriber waits, its buffer on the worker's bus fills, and the trainer waits
for room like for any lossless subscriber: memory stays bounded, nothing is dropped. While
the connection is down the same happens; on reconnecting, the server says how far it has the
events and the rest is sent again (no gap, no duplicate).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, ClassVar

import anyio
from anyio.abc import TaskStatus
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from trainbus.bus import (
    SHUTDOWN_SOURCE,
    ControlChannel,
    ControlError,
    DeliveryPolicy,
    Event,
    Subscriber,
)

from ._errors import SDKError
from ._protocol import (
    CLOSE_BAD_CREDENTIAL,
    CLOSE_PROTOCOL,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    WINDOW_EVENTS,
    ProtocolError,
    command_from_message,
    decode,
    encode,
)

__all__ = ["ServerBridge", "ServerRefused"]

logger = logging.getLogger(__name__)

Progress = Callable[[], dict[str, Any]]
Reattach = Callable[[], Awaitable[str]]
"""Asks the server for a new credential for this process (a restarted server no longer knows
the old one); raises :class:`SDKError` when the server refuses."""


class ServerRefused(SDKError):
    """The server refused this worker for good (wrong credential, another protocol version)."""


class ServerBridge(Subscriber):
    """Carries one job's events to the server and its commands back.

    :param url: the server's worker endpoint, ``ws://host:port/jobs/<id>/worker``.
    :param token: the job's credential (it can publish this job's events and nothing else).
    :param control: where commands from the server go.
    :param progress: the job's ``{"step", "epoch"}`` now, sent with each heartbeat.
    :param first_connect_timeout: how long to keep trying before the first connection.
    :param reconnect_timeout: how long a lost connection may stay lost before the server
        counts as gone (then :attr:`server_gone` is set and :attr:`on_server_gone` runs);
        None: never (an SDK process keeps trying while it runs).
    :param reattach: when the server refuses the credential (it restarted), get a new one;
        without it, a refused credential ends the bridge.
    """

    policy: ClassVar[DeliveryPolicy] = DeliveryPolicy.LOSSLESS
    steers_training: ClassVar[bool] = False  # it sends; the trainer need not wait for that
    buffer_size = 65_536
    max_batch = 4096
    window: ClassVar[int] = WINDOW_EVENTS

    def __init__(
        self,
        *,
        job_id: str,
        url: str,
        token: str,
        control: ControlChannel,
        progress: Progress,
        first_connect_timeout: float = 60.0,
        reconnect_timeout: float | None = 1.0,
        heartbeat_interval: float = 1.0,
        reattach: Reattach | None = None,
    ) -> None:
        self.job_id = job_id
        self.url = url
        self._token = token
        self.control = control
        self.progress = progress
        self.first_connect_timeout = first_connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.heartbeat_interval = heartbeat_interval
        self.reattach = reattach
        self._closing = False
        self._acked_moved = anyio.Event()
        self._unacked: deque[tuple[int, int, str]] = deque()  # (first number, count, message)
        self._in_flight = 0
        self._acked = 0
        self._connection: ClientConnection | None = None
        self._room = anyio.Event()
        self._connected = anyio.Event()
        self._seen_commands: set[str] = set()
        self.worker_id = secrets.token_hex(8)
        """This worker process's identity, sent in its ``hello``: the server numbers its events
        apart from an earlier process's."""
        self._result_acked = anyio.Event()
        self.server_gone = anyio.Event()
        self.refused: str | None = None
        self.on_server_gone: list[Callable[[], None]] = []

    # -- the bus side: events out -----------------------------------------------------------

    async def on_events(self, events: Sequence[Event]) -> None:
        first = events[0].seq
        items = [[e.type.value, e.time, e.data] for e in events]
        text = encode({"type": "events", "first": first, "events": items})
        if len(events) > 1 and len(text) > MAX_MESSAGE_BYTES:
            half = len(events) // 2  # rare (large event data): two messages, each in bounds
            await self.on_events(events[:half])
            await self.on_events(events[half:])
            return
        while self._in_flight >= WINDOW_EVENTS and not self.server_gone.is_set():
            self._room = anyio.Event()
            await self._room.wait()
        if self.refused is not None:
            return  # no server will take them
        # once the server is gone, the run's last events are kept for :meth:`unconfirmed`
        self._unacked.append((first, len(events), text))
        self._in_flight += len(events)
        connection = self._connection
        if connection is not None and not self.server_gone.is_set():
            await self._send(connection, text)

    @staticmethod
    async def _send(connection: ClientConnection, text: str) -> None:
        with contextlib.suppress(ConnectionClosed):  # else sent again after reconnecting
            await connection.send(text)

    # -- the connection ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection to the server until cancelled or the server is gone."""
        task_status.started()
        lost_since: float | None = None
        deadline = time.monotonic() + self.first_connect_timeout
        ever_connected = False
        while not self.server_gone.is_set() and not self._closing:
            try:
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {self._token}"},
                    max_size=None,
                    open_timeout=10,
                    ping_interval=5,
                    ping_timeout=10,
                    close_timeout=2,
                ) as connection:
                    await self._greet(connection)
                    ever_connected, lost_since = True, None
                    await self._serve(connection)
            except ServerRefused as refused:
                self.refused = str(refused)
                logger.error("the server refused job %s's worker: %s", self.job_id, refused)
                self._gone()
                return
            except (OSError, ConnectionClosed, InvalidHandshake, TimeoutError) as error:
                if isinstance(error, InvalidStatus) and error.response.status_code in (401, 403):
                    if self.reattach is None:
                        self.refused = f"the server refused the job credential ({error})"
                        self._gone()
                        return
                    try:
                        self._token = await self.reattach()
                    except SDKError as refused:
                        self.refused = str(refused)
                        self._gone()
                        return
                logger.debug("job %s: connection to the server lost: %r", self.job_id, error)
            finally:
                self._connection = None
                self._connected = anyio.Event()
            if self._closing:
                return  # closed on purpose: no pause before ending
            now = time.monotonic()
            if ever_connected:
                lost_since = lost_since or now
                if self.reconnect_timeout is not None and now - lost_since > self.reconnect_timeout:
                    logger.warning("job %s: the server is gone", self.job_id)
                    self._gone()
                    return
            elif now > deadline:
                self.refused = f"no server answered at {self.url}"
                self._gone()
                return
            await anyio.sleep(0.1)

    def lose_server(self) -> None:
        """The server's process is gone (its pid says so): stop connecting, and run
        :attr:`on_server_gone` now rather than after ``reconnect_timeout``."""
        self._gone()

    def unconfirmed(self, progress: Mapping[str, Any] | None = None) -> list[str]:
        """What a next server must be given: a header naming this process (as its ``hello``
        does) and its run's progress (``progress``, else the one heartbeats send), then the
        ``events`` messages it has not acknowledged, in order (``worker/_unconfirmed.py``)."""
        header = {
            "type": "unconfirmed",
            "protocol": PROTOCOL_VERSION,
            "job_id": self.job_id,
            "worker": self.worker_id,
        }
        ended = self.progress() if progress is None else progress
        header.update({k: ended[k] for k in ("step", "epoch") if k in ended})
        return [encode(header), *(text for _, _, text in self._unacked)]

    def _gone(self) -> None:
        if self.server_gone.is_set():
            return
        self.server_gone.set()
        self._room.set()
        for callback in self.on_server_gone:
            callback()

    async def _greet(self, connection: ClientConnection) -> None:
        hello = {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "job_id": self.job_id,
            "session": self.worker_id,
            "next": self._unacked[0][0] if self._unacked else None,
        }
        await connection.send(encode(hello))
        with anyio.fail_after(10):
            welcome = decode(await connection.recv())
        if welcome["type"] == "error":
            raise ServerRefused(str(welcome.get("message", "refused")))
        if welcome["type"] != "welcome":
            raise ServerRefused(f"expected a welcome, got {welcome['type']!r}")
        self._acknowledged(int(welcome.get("acked", 0)))
        self._connection = connection
        self._connected.set()
        for _, _, text in list(self._unacked):  # what the last connection left unconfirmed
            await self._send(connection, text)

    async def _serve(self, connection: ClientConnection) -> None:
        """Handle the server's messages until the connection ends. Errors are raised after
        the task group, so that the caller sees them bare, not in an exception group."""
        refused: ServerRefused | None = None
        async with anyio.create_task_group() as group:
            group.start_soon(self._heartbeats, connection)
            try:
                async for raw in connection:
                    self._handle(decode(raw))
            except ServerRefused as error:
                refused = error
            except ProtocolError as error:
                with contextlib.suppress(ConnectionClosed):
                    await connection.close(CLOSE_PROTOCOL, str(error)[:120])
            except ConnectionClosed:
                pass  # the caller connects again
            finally:
                group.cancel_scope.cancel()
        if refused is not None:
            raise refused
        if connection.close_code in (CLOSE_BAD_CREDENTIAL, CLOSE_PROTOCOL):
            raise ServerRefused(connection.close_reason or "closed by the server")

    def _handle(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "ack":
            self._acknowledged(int(message.get("upto", 0)))
            if message.get("result"):
                self._result_acked.set()
        elif kind == "command":
            command = command_from_message(message)
            if command.id in self._seen_commands:
                return  # sent again after a reconnect
            self._seen_commands.add(command.id)
            try:
                self.control.deliver(command)
            except ControlError:
                logger.info("job %s: %s arrived after the run ended", self.job_id, command.kind)
            if command.source == SHUTDOWN_SOURCE:
                # the server is shutting down: the run saves and ends as interrupted
                self.control.close()
        elif kind == "error":
            raise ServerRefused(str(message.get("message", "the server reported an error")))

    def _acknowledged(self, upto: int) -> None:
        if upto <= self._acked:
            return
        self._acked = upto
        self._acked_moved.set()
        self._acked_moved = anyio.Event()
        unacked = self._unacked
        while unacked and unacked[0][0] + unacked[0][1] - 1 <= upto:
            self._in_flight -= unacked.popleft()[1]
        self._room.set()

    async def _heartbeats(self, connection: ClientConnection) -> None:
        while True:
            try:
                await connection.send(encode({"type": "heartbeat", **self.progress()}))
            except ConnectionClosed:
                return
            await anyio.sleep(self.heartbeat_interval)

    async def close(self) -> None:
        """End :meth:`run`: close the connection (with its closing handshake) and stop
        reconnecting."""
        self._closing = True
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await connection.close()

    async def wait_acked(self, number: int, timeout: float, *, offline_grace: float = 1.0) -> bool:
        """Wait until the server has acknowledged the events up to ``number`` (at an epoch's
        end: its controllers have decided); False after ``timeout``, or once the connection
        has been down for ``offline_grace`` seconds: training does not wait for a network."""
        clock = time.monotonic
        deadline = clock() + timeout
        offline_since: float | None = None
        while self._acked < number and not self.server_gone.is_set():
            now = clock()
            offline_since = None if self._connection is not None else (offline_since or now)
            if now >= deadline or (offline_since and now - offline_since >= offline_grace):
                return False
            with anyio.move_on_after(0.05):
                await self._acked_moved.wait()
        return self._acked >= number

    # -- the end of the run -----------------------------------------------------------------

    async def finish(self, result: dict[str, Any], last: int, timeout: float = 30.0) -> bool:
        """Send how the run ended once every event up to ``last`` is acknowledged; True when
        the server confirmed it (False: it is gone or did not answer in ``timeout``)."""
        with anyio.move_on_after(timeout):
            while not self.server_gone.is_set():
                connection = self._connection
                if connection is None or self._acked < last:
                    with anyio.move_on_after(0.05):  # woken by each acknowledgement
                        await self._acked_moved.wait()
                    continue
                try:
                    await connection.send(encode({"type": "result", "last": last, **result}))
                except ConnectionClosed:
                    continue
                with anyio.move_on_after(5):
                    await self._result_acked.wait()
                if self._result_acked.is_set():
                    return True
        return False
