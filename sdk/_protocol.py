"""The worker protocol: the messages a job's worker process and the server exchange.

One WebSocket per running process of a job (``/jobs/{id}/worker``), text frames, one JSON
object each with a ``type``. ``docs/PROTOCOL.md`` is the reference; this module is its one
definition in code, used by both ends (the server's worker processes and the SDK).

Worker to server: ``hello`` (first), ``events`` (a batch of the job's events, numbered by
the worker), ``heartbeat`` (its step, once a second), ``result`` (how the run ended, last).
Server to worker: ``welcome`` (answers ``hello``: how far it has the worker's events),
``ack`` (events up to a worker number are published: the worker may send more),
``command`` (stop, pause, resume, save, set_lr), ``error`` (then the server closes).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import orjson

from trainbus.bus import Command, CommandKind

from ._errors import SDKError

__all__ = [
    "CLOSE_BAD_CREDENTIAL",
    "CLOSE_PROTOCOL",
    "CLOSE_REPLACED",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "RUN_ID_PATTERN",
    "WINDOW_EVENTS",
    "ProtocolError",
    "command_from_message",
    "decode",
    "encode",
    "finite",
    "to_json",
]

PROTOCOL_VERSION = 1
"""Bumped when a message changes meaning; a server refuses a ``hello`` of another version."""

WINDOW_EVENTS = 20_000
"""Events a worker may have sent and not had acknowledged: past it, it waits (flow control).
A 0.1 s bulk of batch events of the fastest built-in job is about 1,000."""

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
"""The largest message either end takes; a worker splits a larger batch of events."""

CLOSE_PROTOCOL = 4400
"""Close code: a message the other end cannot read, or a protocol version it does not speak."""
CLOSE_BAD_CREDENTIAL = 4401
"""Close code: the job credential is missing or is not this job's."""
CLOSE_REPLACED = 4409
"""Close code: a newer connection of the same run took over (the older one is let go)."""


RUN_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""An SDK run's id, chosen by the client: the same id always names the same job."""


class ProtocolError(SDKError, ValueError):
    """A message that does not follow the protocol."""


def to_json(value: Any) -> str:
    """Compact JSON; NaN and infinities (a diverging loss) become ``null``, as on the event
    stream. orjson (several times faster: this runs per event) where it takes the value."""
    try:
        return orjson.dumps(value).decode()  # NaN already becomes null
    except TypeError:  # keys or values orjson does not take: the standard library does
        pass
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=str)
    except ValueError:
        return json.dumps(finite(value), separators=(",", ":"), allow_nan=False, default=str)


def finite(value: Any) -> Any:
    """``value`` with NaN and infinities (at any depth) replaced by ``None``."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def encode(message: Mapping[str, Any]) -> str:
    """One message as JSON (:func:`to_json`)."""
    return to_json(message)


def decode(text: str | bytes) -> dict[str, Any]:
    """A received message; :raises ProtocolError: if it is not a JSON object with a type."""
    try:
        message = orjson.loads(text)
    except ValueError as error:
        raise ProtocolError(f"a message is not JSON: {error}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("a message must be a JSON object with a string 'type'")
    return message


def command_from_message(message: Mapping[str, Any]) -> Command:
    """The :class:`Command` a ``command`` message carries (``Command.to_dict`` form)."""
    body = message.get("command")
    if not isinstance(body, Mapping):
        raise ProtocolError("a command message needs a 'command' object")
    try:
        value = body.get("value")
        return Command(
            str(body["command_id"]),
            CommandKind(body["command"]),
            str(body.get("source", "api")),
            str(body.get("reason", "")),
            None if value is None else float(value),
            float(body.get("issued_at", 0.0)),
        )
    except (KeyError, ValueError, TypeError) as error:
        raise ProtocolError(f"a command message is malformed: {error!r}") from None
