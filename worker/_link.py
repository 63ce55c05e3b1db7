"""The server's end of the worker protocol: one :class:`WorkerLink` per run of a job.

The link checks the job's credential, publishes the worker's events on the server's bus (in
order, each once, with the server's ``seq``), acknowledges them, forwards the job's commands
and keeps the worker's heartbeat and final result for the supervisor.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import anyio

from trainbus.bus import (
    Command,
    ControlChannel,
    Event,
    EventType,
    UnknownEventName,
    event_type_for,
)
from trainbus.sdk import PROTOCOL_VERSION, ProtocolError, decode, encode

__all__ = [
    "SERVER_EVENT_TYPES",
    "Durable",
    "Replaced",
    "Steered",
    "WorkerConnection",
    "WorkerLink",
    "events_after",
]

logger = logging.getLogger(__name__)

SERVER_EVENT_TYPES = frozenset(
    {
        EventType.JOB_QUEUED,
        EventType.JOB_STARTED,
        EventType.JOB_COMPLETED,
        EventType.JOB_STOPPED,
        EventType.JOB_FAILED,
        EventType.JOB_INTERRUPTED,
        EventType.JOB_STALLED,
        EventType.GAP,
    }
)
"""Events only the server publishes (a job's state moves): a worker that sends one breaks the
protocol."""

Item = tuple[EventType, Mapping[str, Any], float]
Publish = Callable[[str, list[Item]], Awaitable[list[Event]]]
"""Publishes a worker's events on the server's bus, in order, waiting for room."""
Durable = Callable[[str, int, str, int], Awaitable[None]]
"""``(job_id, seq, session, number)``: returns once the event store holds ``job_id``'s events
up to ``seq`` together with the mark "worker ``session`` is published up to ``number``", so
that what the server acknowledges survives a crash of the server."""
Steered = Callable[[Event], Awaitable[None]]
"""Returns once the server's steering subscribers (controllers) have handled the event."""


class Replaced(ProtocolError):
    """The connection's run was taken over by a newer process (close 4409)."""


class WorkerConnection(Protocol):
    """What a link needs of a WebSocket: text in, text out."""

    async def send_text(self, text: str) -> None: ...

    async def receive_text(self) -> str: ...


class WorkerLink:
    """The server's side of one run's worker connection.

    :param publish: ``(job_id, [(type, data, time), ...])`` publishes events on the server's
        bus in order (waiting for room: the worker's flow control rests on it).
    :param control: the job's control channel on the server (the API and controllers send
        to it); the link forwards what arrives there to the worker.
    """

    def __init__(
        self,
        job_id: str,
        token: str,
        control: ControlChannel,
        publish: Publish,
        *,
        durable: Durable | None = None,
        steered: Steered | None = None,
        mark: tuple[str, int] | None = None,
    ) -> None:
        self.job_id = job_id
        self._token = token
        self.control = control
        self._publish = publish
        self._durable = durable
        self._steered = steered
        self.session, self.acked = mark if mark is not None else ("", 0)
        """The worker session (a random id each worker process picks) and the highest number
        of its events the server has published and acknowledged."""
        self.result: dict[str, Any] | None = None
        self.step = 0
        self.epoch = 0
        self.last_progress = time.monotonic()
        """When (``time.monotonic``) the step last moved, or the run started or resumed."""
        self.last_heartbeat: float | None = None
        self.connected = False
        self.stop_requested = anyio.Event()
        self._unsent: list[Command] = []  # taken from the control channel, not yet sent
        self._sent: list[Command] = []  # sent on a connection that may have dropped them
        self._generation = 0

    @property
    def ever_connected(self) -> bool:
        """Whether a worker of this run has connected (said hello) since the run started."""
        return self._generation > 0

    def accepts(self, token: str) -> bool:
        """Whether ``token`` is this run's credential (compared in constant time)."""
        return hmac.compare_digest(token.encode(), self._token.encode())

    def replace_token(self, token: str) -> None:
        """A new process of the run took over: only its credential opens the link now, and
        the older connection is let go at its next message."""
        self._token = token
        self._generation += 1

    async def serve(self, connection: WorkerConnection) -> None:
        """Speak the protocol with one worker connection until it closes or the run ends.

        :raises ProtocolError: on a message that breaks the protocol (the caller closes).
        """
        self._generation += 1
        generation = self._generation
        hello = decode(await connection.receive_text())
        if hello["type"] != "hello":
            raise ProtocolError(f"the first message must be a hello, not {hello['type']!r}")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolError(
                f"this server speaks worker protocol {PROTOCOL_VERSION}, "
                f"the worker {hello.get('protocol')!r}"
            )
        if hello.get("job_id") != self.job_id:
            raise ProtocolError("the hello names another job than the credential")
        session = hello.get("session")
        if not isinstance(session, str) or not 0 < len(session) <= 64:
            raise ProtocolError("the hello needs a 'session' string of 1 to 64 characters")
        if session != self.session:  # a new worker process: its numbering starts at 1
            self.session, self.acked = session, 0
        await connection.send_text(encode({"type": "welcome", "acked": self.acked}))
        self.connected = True
        self._unsent[:0] = self._sent  # the previous connection may have lost them
        self._sent = []
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._forward_commands, connection, generation)
                while self.result is None:
                    message = decode(await connection.receive_text())
                    if generation != self._generation:
                        raise Replaced("a newer connection of this run took over")
                    await self._handle(connection, message)
                group.cancel_scope.cancel()
        except BaseExceptionGroup as errors:
            # the caller handles one error, not the task group's wrapping of it
            if len(errors.exceptions) == 1:
                raise errors.exceptions[0] from None
            raise
        finally:
            if self._generation == generation:
                self.connected = False

    async def _handle(self, connection: WorkerConnection, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "events":
            await self._events(connection, message)
        elif kind == "heartbeat":
            self.last_heartbeat = time.monotonic()
            self._progress(message)
        elif kind == "result":
            if int(message.get("last") or 0) > self.acked:
                raise ProtocolError("a result came before the events it follows")
            self.result = dict(message)
            await connection.send_text(encode({"type": "ack", "upto": self.acked, "result": True}))
        else:
            raise ProtocolError(f"unknown message type {kind!r}")

    def _progress(self, message: Mapping[str, Any]) -> None:
        step = message.get("step")
        if isinstance(step, int) and step != self.step:
            self.step = step
            self.last_progress = time.monotonic()
        epoch = message.get("epoch")
        if isinstance(epoch, int):
            self.epoch = epoch
        if message.get("paused"):
            self.last_progress = time.monotonic()  # a paused job is not stalled

    async def _events(self, connection: WorkerConnection, message: dict[str, Any]) -> None:
        first = message.get("first")
        if isinstance(first, int) and first > self.acked + 1:
            raise ProtocolError(f"events from {first} but {self.acked + 1} is the next expected")
        items, last = events_after(message, self.acked)
        if items:
            published = await self._publish(self.job_id, items)
            if self._durable is not None:
                await self._durable(self.job_id, published[-1].seq, self.session, last)
            self.acked = last
            if self._steered is not None:
                # the worker waits for this ack at an epoch's end: the controllers' decisions
                # (a stop, a new learning rate) reach it first, before its next epoch
                for event in published:
                    if event.type is EventType.FIT_EPOCH_END:
                        await self._steered(event)
                await self._send_commands(connection, self.control.take())
        await connection.send_text(encode({"type": "ack", "upto": self.acked}))

    async def _forward_commands(self, connection: WorkerConnection, generation: int) -> None:
        control = self.control
        while generation == self._generation:
            if not self._unsent:
                self._unsent = await anyio.to_thread.run_sync(control.wait, 0.25)
                if not self._unsent and control.closed:
                    return
            if generation == self._generation:
                await self._send_commands(connection, [])

    async def _send_commands(self, connection: WorkerConnection, taken: list[Command]) -> None:
        self._unsent.extend(taken)
        while self._unsent:
            command = self._unsent.pop(0)
            if command.kind.value == "stop":
                self.stop_requested.set()
            self._sent = [*self._sent[-99:], command]  # the worker ignores ids it has seen
            message = {"type": "command", "command": command.to_dict()}
            await connection.send_text(encode(message))


def events_after(message: Mapping[str, Any], acked: int) -> tuple[list[Item], int]:
    """The checked events of an ``events`` message numbered after ``acked`` (the ones before
    were published already: a worker sends them again after a reconnect), and the number of
    the message's last event."""
    first, raw = message.get("first"), message.get("events")
    if not isinstance(first, int) or not isinstance(raw, list) or first < 1:
        raise ProtocolError("an events message needs an int 'first' >= 1 and a list 'events'")
    items = [_checked_item(entry) for entry in raw[max(0, acked + 1 - first) :]]
    return items, first + len(raw) - 1


def _checked_item(entry: Any) -> Item:
    """One ``[type, time, data]`` entry of an events message, checked."""
    if not isinstance(entry, list) or len(entry) != 3:
        raise ProtocolError("each event is a [type, time, data] list")
    name, when, data = entry
    try:
        event_type = event_type_for(name)
    except (UnknownEventName, TypeError, ValueError):
        raise ProtocolError(f"unknown event type {name!r}") from None
    if event_type in SERVER_EVENT_TYPES:
        raise ProtocolError(f"{event_type.value} is the server's to publish, not a worker's")
    if not isinstance(when, (int, float)) or not math.isfinite(when):
        raise ProtocolError("an event's time is a finite number of seconds")
    if not isinstance(data, dict):
        raise ProtocolError("an event's data is a JSON object")
    return (event_type, data, float(when))
