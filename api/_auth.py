"""The API token: bearer headers on HTTP and WebSocket handshakes, a subprotocol for browsers,
the Origin allowlist (WebSocket handshakes and state-changing requests) and the Host allowlist.

Browsers cannot set ``Authorization`` on a WebSocket, and a token in the URL would land in
access logs. They offer two subprotocols instead, ``trainbus`` and ``trainbus.bearer.<token>``;
the server checks the second and echoes only ``trainbus``.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import stat
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr
from starlette.requests import HTTPConnection

from ._local import read_token_file, token_file
from ._settings import Settings, is_loopback_host

WORKER_PATH = re.compile(r"^/jobs/[0-9a-zA-Z_-]{1,64}/worker$")
"""WebSocket paths that take a job's credential instead of the API token (a worker process,
which sends no ``Origin``: a browser page never gets past this exemption)."""

__all__ = [
    "BEARER_SUBPROTOCOL_PREFIX",
    "MISSING_TOKEN",
    "SUBPROTOCOL",
    "WORKER_PATH",
    "HostMiddleware",
    "HostPolicy",
    "OriginPolicy",
    "TokenCheck",
    "TokenFileRefused",
    "TokenMiddleware",
    "announce_generated_token",
    "ensure_token",
    "offered_subprotocols",
    "write_token_file",
]

SUBPROTOCOL = "trainbus"
BEARER_SUBPROTOCOL_PREFIX = "trainbus.bearer."


def ensure_token(settings: Settings) -> tuple[Settings, bool]:
    """Return settings that carry a token, and whether it was generated just now.

    Without one, the token a previous start left in the data folder is used again, so that
    a restart does not lock out the clients that know it.

    :raises ValueError: when a non-loopback address would be bound without an explicit token.
    """
    if settings.token is not None:
        return settings, False
    if not settings.loopback_only:
        raise ValueError(
            f"refusing to bind {settings.host!r} without an explicit token: set TRAINBUS_TOKEN "
            "(or --token), or bind 127.0.0.1"
        )
    kept = _kept_token(settings.data_dir)
    if kept is not None and len(kept) >= 8:
        return settings.model_copy(update={"token": SecretStr(kept)}), False
    token = SecretStr(secrets.token_urlsafe(32))
    return settings.model_copy(update={"token": token}), True


class TokenFileRefused(ValueError):
    """Raised when the token file cannot be written safely (a folder others can write, a
    symbolic link where the file goes)."""


def _check_token_folder(folder: Path) -> None:
    info = folder.stat()
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise TokenFileRefused(
            f"refusing to write the API token into {folder}: the folder belongs to another "
            "user; use a data folder of your own (--data-dir) or set TRAINBUS_TOKEN"
        )
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise TokenFileRefused(
            f"refusing to write the API token into {folder}: other users may write to the "
            f"folder (mode {stat.filemode(info.st_mode)}); run 'chmod go-w {folder}', use "
            "another data folder, or set TRAINBUS_TOKEN"
        )


def write_token_file(data_dir: Path, token: SecretStr) -> Path:
    """Write ``token`` to ``data_dir/token``, readable by its owner only (mode 0600).

    The token goes to a new file (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) that then
    replaces ``token``: an existing file of looser mode is replaced, never reused, and no
    symbolic link is followed.

    :raises TokenFileRefused: if the folder belongs to another user or others may write to
        it, or ``token`` is a symbolic link.
    """
    path = token_file(data_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_token_folder(path.parent)
    if path.is_symlink():
        raise TokenFileRefused(
            f"refusing to write the API token: {path} is a symbolic link; remove it"
        )
    temporary = path.with_name(f".token.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(temporary, flags, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(token.get_secret_value() + "\n")
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def announce_generated_token(path: Path) -> None:
    """Say where a generated token was written (stderr); the token itself is never printed."""
    print(
        f"trainbus: generated an API token in {path} (readable by you only); local CLI "
        "commands read it from there",
        file=sys.stderr,
        flush=True,
    )


def _kept_token(data_dir: Path) -> str | None:
    """The token an earlier start wrote, if the file is still one only this user controls: a
    regular file of this user's, mode 0600 or stricter, in a folder others cannot write."""
    path = token_file(data_dir)
    try:
        info = path.lstat()
    except OSError:
        return None
    _check_token_folder(data_dir)
    owned = not hasattr(os, "geteuid") or info.st_uid == os.geteuid()
    if not stat.S_ISREG(info.st_mode) or not owned or info.st_mode & 0o077:
        return None  # a new token replaces it (or, for a symbolic link, is refused)
    return read_token_file(data_dir)


def offered_subprotocols(connection: HTTPConnection) -> list[str]:
    """The subprotocols a WebSocket client offered in ``Sec-WebSocket-Protocol``."""
    offered: list[str] = []
    for value in connection.headers.getlist("sec-websocket-protocol"):
        offered.extend(part.strip() for part in value.split(",") if part.strip())
    return offered


class TokenCheck:
    """Checks the credentials of a request or WebSocket handshake against the token."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token.get_secret_value().encode()

    def matches(self, candidate: str) -> bool:
        # compare_digest: the time taken does not reveal how much of the token matched
        return secrets.compare_digest(candidate.encode(), self._token)

    def bearer(self, connection: HTTPConnection) -> str | None:
        """The token presented in ``Authorization: Bearer <token>``, if any."""
        header = connection.headers.get("authorization")
        if header is None:
            return None
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return value.strip()

    def authorized(self, connection: HTTPConnection, *, websocket: bool = False) -> bool:
        """True when ``connection`` presents the token (for WebSockets, also as subprotocol)."""
        presented = self.bearer(connection)
        if presented is not None and self.matches(presented):
            return True
        if websocket:
            for protocol in offered_subprotocols(connection):
                if protocol.startswith(BEARER_SUBPROTOCOL_PREFIX) and self.matches(
                    protocol[len(BEARER_SUBPROTOCOL_PREFIX) :]
                ):
                    return True
        return False


def _origin_parts(origin: str) -> tuple[str, str, int | None] | None:
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    return parts.scheme, parts.hostname, port


class OriginPolicy:
    """Which ``Origin`` headers may open a WebSocket.

    A handshake without ``Origin`` comes from a non-browser client (the CLI, a notebook) and is
    allowed; the token still guards it. Allowed loopback origins match on any port, since
    local dashboards run on ports of their own.
    """

    def __init__(self, allowed: Iterable[str]) -> None:
        self.allow_any = False
        self._allowed: list[tuple[str, str, int | None]] = []
        for origin in allowed:
            if origin.strip() == "*":
                self.allow_any = True
                continue
            parts = _origin_parts(origin)
            if parts is not None:
                self._allowed.append(parts)

    def allows(self, origin: str | None) -> bool:
        if origin is None or self.allow_any:
            return True
        parts = _origin_parts(origin)
        if parts is None:
            return False
        scheme, host, port = parts
        for allowed_scheme, allowed_host, allowed_port in self._allowed:
            if scheme != allowed_scheme or host != allowed_host:
                continue
            if allowed_port is None and is_loopback_host(host):
                return True
            if allowed_port == port:
                return True
        return False

    @property
    def origins(self) -> Sequence[str]:
        return [
            f"{scheme}://{host}" + ("" if port is None else f":{port}")
            for scheme, host, port in self._allowed
        ]


def _json_denial(status: int, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    import json

    body = json.dumps({"detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    return headers, body


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
"""Methods that change nothing; the others are refused from an Origin outside the allowlist."""
FOREIGN_ORIGIN = "this Origin may not {what}: add it to TRAINBUS_ALLOWED_ORIGINS"

MISSING_TOKEN = (
    "missing or wrong API token: send 'Authorization: Bearer <token>' (the token is printed "
    "when the server starts, or set with TRAINBUS_TOKEN)"
)
MISSING_TOKEN_WS = (
    MISSING_TOKEN + "; browsers may offer the WebSocket subprotocols 'trainbus' and "
    "'trainbus.bearer.<token>' instead"
)


class TokenMiddleware:
    """Refuses HTTP requests and WebSocket handshakes without the token (ASGI middleware).

    It sits in front of every route, so a route cannot be added without protection; the
    exempt paths are listed here and nowhere else. WebSocket handshakes from an ``Origin``
    outside the allowlist are refused with 403 before they are accepted.
    """

    def __init__(
        self,
        app: Any,
        *,
        token: SecretStr,
        origins: OriginPolicy,
        exempt_paths: Iterable[str] = ("/healthz",),
        own_origin: bool = False,
    ) -> None:
        self.app = app
        # only while the Host allowlist is on: with any Host answered, a rebound name's page
        # would count as the server's own
        self.own_origin = own_origin
        self.check = TokenCheck(token)
        self.origins = origins
        self.exempt_paths = frozenset(exempt_paths)

    def _origin_allowed(self, connection: HTTPConnection) -> bool:
        """The allowlist, or the server's own origin (the dashboard it serves): an ``Origin``
        naming the request's ``Host``, which the Host allowlist has already checked."""
        origin = connection.headers.get("origin")
        if self.origins.allows(origin):
            return True
        if origin is None or not self.own_origin:
            return False
        try:
            parts = urlsplit(origin.strip().lower())
        except ValueError:
            return False
        host = connection.headers.get("host", "").strip().lower()
        return parts.scheme in ("http", "https") and bool(host) and parts.netloc == host

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "http":
            connection = HTTPConnection(scope)
            if scope["method"] not in SAFE_METHODS and not self._origin_allowed(connection):
                # a browser page elsewhere must not change state here, token or not
                headers, body = _json_denial(403, FOREIGN_ORIGIN.format(what="change state"))
                await send({"type": "http.response.start", "status": 403, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            elif scope["method"] == "OPTIONS" or scope["path"] in self.exempt_paths:
                await self.app(scope, receive, send)
            elif not self.check.authorized(connection):
                headers, body = _json_denial(401, MISSING_TOKEN)
                await send({"type": "http.response.start", "status": 401, "headers": headers})
                await send({"type": "http.response.body", "body": body})
            else:
                await self.app(scope, receive, send)
        elif kind == "websocket":
            connection = HTTPConnection(scope)
            if WORKER_PATH.match(scope["path"]) and "origin" not in connection.headers:
                # a job's worker process: the route checks the job's own credential
                await self.app(scope, receive, send)
            elif not self._origin_allowed(connection):
                await _deny_websocket(
                    scope, send, 403, FOREIGN_ORIGIN.format(what="open WebSockets")
                )
            elif not self.check.authorized(connection, websocket=True):
                await _deny_websocket(scope, send, 401, MISSING_TOKEN_WS)
            else:
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower().rstrip(".")
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class HostPolicy:
    """Which ``Host`` headers the server answers: the defence against DNS rebinding.

    A rebinding attack points a name the attacker owns at 127.0.0.1, so the victim's browser
    sends ``Host: attacker.example``. Answered are: IP literals (no name to rebind),
    ``localhost`` and ``*.localhost``, the bind address, and the names configured in
    ``allowed_hosts`` (``*.example.com`` matches subdomains; ``*`` turns the check off).
    """

    def __init__(self, allowed_hosts: Iterable[str], bind_host: str) -> None:
        names = {_host_name(host) for host in allowed_hosts if host.strip()}
        self.allow_any = "*" in names
        self._suffixes = tuple(name[1:] for name in names if name.startswith("*."))
        self._names = {name for name in names if not name.startswith("*")}
        self._names.add(_host_name(bind_host))

    def allows(self, header: str | None) -> bool:
        if header is None or self.allow_any:
            return True  # HTTP/1.0 clients send none; browsers always do
        name = _host_name(header)
        if name in self._names or name == "localhost" or name.endswith(".localhost"):
            return True
        if name.endswith(self._suffixes) and self._suffixes:
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


FOREIGN_HOST = (
    "this server does not answer to Host {host!r}: add the name to TRAINBUS_ALLOWED_HOSTS "
    "(names are checked to defend against DNS rebinding)"
)


class HostMiddleware:
    """Refuses HTTP requests and WebSocket handshakes for a ``Host`` outside the policy (400)."""

    def __init__(self, app: Any, *, policy: HostPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = HTTPConnection(scope).headers.get("host")
        if self.policy.allows(host):
            await self.app(scope, receive, send)
            return
        detail = FOREIGN_HOST.format(host=(host or "")[:100])
        if scope["type"] == "websocket":
            await _deny_websocket(scope, send, 400, detail)
            return
        headers, body = _json_denial(400, detail)
        await send({"type": "http.response.start", "status": 400, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def _deny_websocket(scope: Any, send: Any, status: int, detail: str) -> None:
    """Refuse a handshake: an HTTP error response where the server supports it, else close."""
    if "websocket.http.response" in scope.get("extensions", {}):
        headers, body = _json_denial(status, detail)
        await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": detail[:120]})
