"""The control channel: commands sent to a running trainer, honoured at safe points."""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ._errors import ControlError
from ._events import Event, EventType

__all__ = [
    "CONTROLLER_SOURCES",
    "SHUTDOWN_SOURCE",
    "Command",
    "CommandKind",
    "ControlChannel",
]


SHUTDOWN_SOURCE = "shutdown"
"""The source of the pause a server shutdown sends: its save reason is ``shutdown``."""
CONTROLLER_SOURCES = frozenset({"early_stop", "lr_plateau"})
"""Stops from these sources end a job ``completed`` with its ``stop_reason`` set, as Keras,
Lightning and Ultralytics end an early-stopped run normally."""


class CommandKind(StrEnum):
    """What a control command asks the trainer to do."""

    STOP = "stop"
    PAUSE = "pause"
    RESUME = "resume"
    SAVE = "save"
    SET_LR = "set_lr"

    @property
    def applied_event_type(self) -> EventType:
        """The event published when a command of this kind takes effect."""
        return _APPLIED_EVENT_TYPES[self]


_APPLIED_EVENT_TYPES = {
    CommandKind.STOP: EventType.JOB_STOPPING,
    CommandKind.PAUSE: EventType.JOB_PAUSED,
    CommandKind.RESUME: EventType.JOB_RESUMED,
    CommandKind.SAVE: EventType.MODEL_SAVE,
    CommandKind.SET_LR: EventType.LR_CHANGED,
}


@dataclass(frozen=True, slots=True)
class Command:
    """One control command: its id, kind, who sent it and why, and a value for ``set_lr``."""

    id: str
    kind: CommandKind
    source: str
    reason: str
    value: float | None
    issued_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "command_id": self.id,
            "command": self.kind.value,
            "source": self.source,
            "reason": self.reason,
            "value": self.value,
            "issued_at": self.issued_at,
        }


Publisher = Callable[[str, EventType, Mapping[str, Any]], Event]


class ControlChannel:
    """A job's control channel, shared by the API, controller subscribers and the trainer.

    Senders (any thread) call :meth:`stop`, :meth:`pause`, :meth:`resume`, :meth:`save`,
    :meth:`set_lr`. The trainer checks :attr:`pending` at batch boundaries (an attribute
    read), takes commands with :meth:`take`, blocks in :meth:`wait` while paused, and reports
    each command it applied with :meth:`applied`, which publishes the matching event.
    """

    def __init__(self, job_id: str, publish: Publisher | None = None) -> None:
        self.job_id = job_id
        self._publish = publish
        self._condition = threading.Condition()
        self._queue: deque[Command] = deque()
        self.pending = False
        self.closed = False

    # -- sending ----------------------------------------------------------------------------

    def send(
        self,
        kind: CommandKind | str,
        *,
        source: str = "api",
        reason: str = "",
        value: float | None = None,
    ) -> Command:
        """Queue a command for the trainer and return it.

        :raises ControlError: if the channel is closed or ``set_lr`` lacks a positive value.
        """
        kind = CommandKind(kind)
        if kind is CommandKind.SET_LR:
            if value is None or not math.isfinite(value) or value <= 0:
                raise ControlError(f"set_lr needs a positive, finite learning rate, got {value!r}")
        elif value is not None:
            raise ControlError(f"{kind.value} takes no value")
        return self.deliver(
            Command(uuid.uuid4().hex[:16], kind, source, reason, value, time.time())
        )

    def deliver(self, command: Command) -> Command:
        """Queue a command made elsewhere (a worker process receives the server's commands,
        ids and all, so that the acknowledgement names the command the API returned).

        :raises ControlError: if the channel is closed.
        """
        with self._condition:
            if self.closed:
                raise ControlError(f"job {self.job_id!r} no longer accepts commands")
            self._queue.append(command)
            self.pending = True
            self._condition.notify_all()
        return command

    def stop(self, reason: str = "", *, source: str = "api") -> Command:
        """Ask the trainer to finish the current batch and end the job."""
        return self.send(CommandKind.STOP, source=source, reason=reason)

    def pause(self, reason: str = "", *, source: str = "api") -> Command:
        """Ask the trainer to hold at the next batch boundary until resumed."""
        return self.send(CommandKind.PAUSE, source=source, reason=reason)

    def resume(self, reason: str = "", *, source: str = "api") -> Command:
        """Ask a paused trainer to continue."""
        return self.send(CommandKind.RESUME, source=source, reason=reason)

    def save(self, reason: str = "", *, source: str = "api") -> Command:
        """Ask the trainer for a checkpoint at the next batch boundary."""
        return self.send(CommandKind.SAVE, source=source, reason=reason)

    def set_lr(self, value: float, reason: str = "", *, source: str = "api") -> Command:
        """Ask the trainer to set every parameter group's learning rate to ``value``."""
        return self.send(CommandKind.SET_LR, source=source, reason=reason, value=value)

    # -- trainer side -----------------------------------------------------------------------

    def take(self) -> list[Command]:
        """Take every queued command, oldest first (empty when none)."""
        if not self.pending:
            return []
        with self._condition:
            commands = list(self._queue)
            self._queue.clear()
            self.pending = False
        return commands

    def wait(self, timeout: float | None = None) -> list[Command]:
        """Block the calling (training) thread until commands arrive; take them.

        Returns an empty list on timeout or when the channel is closed.
        """
        with self._condition:
            self._condition.wait_for(lambda: self.pending or self.closed, timeout)
        return self.take()

    def applied(self, command: Command, *, step: int, **data: Any) -> Event | None:
        """Publish that ``command`` took effect at ``step`` (the stream is the audit log)."""
        if self._publish is None:
            return None
        payload = {**command.to_dict(), "step": step, **data}
        return self._publish(self.job_id, command.kind.applied_event_type, payload)

    def close(self) -> None:
        """Refuse further commands and release a trainer blocked in :meth:`wait`."""
        with self._condition:
            self.closed = True
            self._condition.notify_all()
