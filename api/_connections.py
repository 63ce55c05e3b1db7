"""What a TCP connection may cost the server before it has sent a request.

uvicorn closes a connection that stays idle *after* a response (``timeout_keep_alive``), but
not one that never sends a complete request: a client could open connections and send
nothing (or a header a byte a minute) until the process ran out of file descriptors, and then
the server's own work (checkpoints, SQLite, logs) failed with EMFILE. Two bounds, both at the
protocol level, before any ASGI code runs:

- a connection must send a complete request (head and body) within ``request_timeout``
  seconds of connecting, or of its first byte after a keep-alive pause; else it is closed;
- a connection accepted onto a file descriptor in the top ``reserved_file_descriptors`` of
  ``RLIMIT_NOFILE`` is closed at once, inside the listening socket's ``accept`` (asyncio
  accepts a whole backlog before any protocol sees a connection, so the check cannot wait for
  the protocol). The kernel hands out the lowest free descriptor, so a connection gets one of
  those only when every lower one is in use: connections never hold the reserve, which stays
  for the server's own files.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no RLIMIT_NOFILE
    resource = None  # type: ignore[assignment]

__all__ = [
    "ConnectionGuard",
    "GuardedH11Protocol",
    "ReservingListener",
    "guarded_protocol",
    "open_file_limit",
]

logger = logging.getLogger(__name__)

LOG_EVERY_SECONDS = 10.0
"""Refused and timed-out connections are logged at most this often (a flood is one line)."""


def open_file_limit() -> int | None:
    """The process's soft ``RLIMIT_NOFILE`` (None: unlimited or unknown)."""
    if resource is None:  # pragma: no cover
        return None
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


@dataclass
class ConnectionGuard:
    """The bounds and their counters, shared by every connection of one server."""

    request_timeout: float
    reserved_file_descriptors: int
    refused: int = 0
    """Connections closed at accept: they would have used the descriptor reserve."""
    timed_out: int = 0
    """Connections closed for not sending a complete request in time."""
    _logged_at: float = float("-inf")

    def admits(self, descriptor: int) -> bool:
        limit = open_file_limit()
        if limit is None or descriptor < limit - self.reserved_file_descriptors:
            return True
        self.refused += 1
        self._log(
            "refusing connections: file descriptor %d of %d would eat into the %d kept for "
            "the server's own files (%d refused so far)",
            descriptor,
            limit,
            self.reserved_file_descriptors,
            self.refused,
        )
        return False

    def timed_out_one(self) -> None:
        self.timed_out += 1
        self._log(
            "closed a connection that sent no complete request within %.1f s (%d so far)",
            self.request_timeout,
            self.timed_out,
        )

    def _log(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY_SECONDS:
            self._logged_at = now
            logger.warning(message, *args)


class ReservingListener(socket.socket):
    """A listening socket whose ``accept`` closes, on the spot, each connection that landed
    on a descriptor the :class:`ConnectionGuard` keeps in reserve."""

    guard: ConnectionGuard

    @classmethod
    def wrap(cls, sock: socket.socket, guard: ConnectionGuard) -> ReservingListener:
        """Take over ``sock`` (bound and listening; ``sock`` is detached)."""
        listener = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        listener.guard = guard
        return listener

    def accept(self) -> tuple[socket.socket, Any]:
        while True:  # until one is admitted, or BlockingIOError: no connection is pending
            connection, address = super().accept()
            if self.guard.admits(connection.fileno()):
                return connection, address
            connection.close()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol that closes a connection that sends no complete request within
    the :class:`ConnectionGuard`'s ``request_timeout``."""

    guard: ConnectionGuard = ConnectionGuard(request_timeout=15.0, reserved_file_descriptors=64)
    _request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_request_timer()

    def data_received(self, data: bytes) -> None:
        if self._request_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_request_timer()  # a new request starts after a keep-alive pause
        super().data_received(data)
        if self._request_complete():
            self._disarm_request_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.transport.is_closing() or self._request_complete():
            self._disarm_request_timer()  # closing, or a pipelined request handled whole
        elif self.conn.their_state is h11.SEND_BODY or self.conn.trailing_data[0]:
            self._arm_request_timer()  # part of the next request is already here

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_request_timer()
        super().connection_lost(exc)

    def _request_complete(self) -> bool:
        if self.transport.get_protocol() is not self:  # upgraded to a WebSocket
            return True
        return self.conn.their_state not in (h11.IDLE, h11.SEND_BODY)

    def _arm_request_timer(self) -> None:
        self._disarm_request_timer()
        self._request_timer = self.loop.call_later(
            self.guard.request_timeout, self._request_timed_out
        )

    def _disarm_request_timer(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.transport.is_closing() or self._request_complete():
            return
        self.guard.timed_out_one()
        self.transport.abort()


def guarded_protocol(guard: ConnectionGuard) -> type[GuardedH11Protocol]:
    """A :class:`GuardedH11Protocol` class bound to ``guard`` (uvicorn takes a class)."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"guard": guard})
