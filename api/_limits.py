"""Limits on what a request may look like, checked before routing.

Bodies: one larger than ``max_body_bytes`` is refused with 413 before it is read into memory
(declared ``Content-Length``) or as soon as it grows past the limit (chunked uploads).
A JSON body over ``STRUCTURE_CHECK_BYTES`` is read whole first (off the event loop) and refused
with 422 if one of its objects holds more than ``MAX_OBJECT_KEYS`` keys: validating 100,000
unknown keys costs the validator a second and a half on the event loop, and no request here
needs more than a few dozen.
Paths: a decoded path with a ``.`` or ``..`` segment, a NUL byte or a backslash names no
resource here and is refused with 400, so that no route, redirect or file lookup sees one.
Query strings: a parameter the endpoint does not take is refused with 422 (a misspelt
``after_seq`` would otherwise silently return everything).
"""

from __future__ import annotations

import json
from typing import Any

import anyio
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection

__all__ = [
    "BodyLimitMiddleware",
    "PathGuardMiddleware",
    "body_too_large",
    "hostile_path",
    "known_query_parameters",
]


def body_too_large(limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"the request body is larger than {limit:,} bytes: send a smaller body "
        "(or raise TRAINBUS_MAX_BODY_BYTES)",
    )


STRUCTURE_CHECK_BYTES = 64 * 1024
"""JSON bodies larger than this are checked for :data:`MAX_OBJECT_KEYS` before validation."""
MAX_OBJECT_KEYS = 1000
"""Most keys one JSON object of a request body may hold."""


class TooManyKeys(ValueError):
    """Raised when a JSON object of a body holds more than :data:`MAX_OBJECT_KEYS` keys."""


def _count_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    if len(pairs) > MAX_OBJECT_KEYS:
        raise TooManyKeys(len(pairs))
    return dict(pairs)


def too_many_keys(body: bytes) -> int | None:
    """The key count of the first over-full object in ``body`` (None: none, or not JSON)."""
    try:
        json.loads(body, object_pairs_hook=_count_keys)
    except TooManyKeys as error:
        return int(error.args[0])
    except (ValueError, RecursionError):  # not JSON, or too deep: the route's parsing answers
        return None
    return None


class BodyLimitMiddleware:
    """Refuses HTTP request bodies over ``limit`` bytes with 413, and large JSON bodies with
    over-full objects with 422 (ASGI middleware)."""

    def __init__(self, app: Any, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await _refuse(send, body_too_large(self.limit))
            return
        if declared is not None and declared > STRUCTURE_CHECK_BYTES and _is_json(scope):
            await self._checked_json(scope, receive, send)
            return
        received = 0
        started = False

        async def limited_receive() -> Any:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI passes an HTTPException raised while reading the body on to the
                    # app's handler, which answers 413
                    raise body_too_large(self.limit)
            return message

        async def tracking_send(message: Any) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except HTTPException as error:
            if error.status_code != 413 or started:
                raise
            await _refuse(send, error)

    async def _checked_json(self, scope: Any, receive: Any, send: Any) -> None:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await _refuse(send, body_too_large(self.limit))
                return
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        keys = await anyio.to_thread.run_sync(too_many_keys, body)
        if keys is not None:
            await _refuse_keys(send, keys)
            return
        replayed = False

        async def replay() -> Any:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


def _is_json(scope: Any) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            return b"json" in value.lower()
    return False


async def _refuse_keys(send: Any, keys: int) -> None:
    message = (
        f"a JSON object in the body holds {keys:,} keys, over the {MAX_OBJECT_KEYS:,} allowed: "
        "send only the fields the endpoint takes (see /docs)"
    )
    error = {"type": "too_many_keys", "loc": ["body"], "msg": message}
    body = json.dumps({"detail": [error], "message": f"invalid request: {message}"}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 422, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def hostile_path(path: str) -> bool:
    """True for a decoded path with a dot segment, a NUL byte or a backslash."""
    if "\x00" in path or "\\" in path:
        return True
    return any(segment in (".", "..") for segment in path.split("/"))


BAD_PATH = (
    "the path may not contain '.' or '..' segments, NUL bytes or backslashes (also when "
    "percent-encoded): use the ids and names the API lists"
)


class PathGuardMiddleware:
    """Refuses HTTP requests and WebSocket handshakes whose path :func:`hostile_path` (400)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or not hostile_path(scope["path"]):
            await self.app(scope, receive, send)
            return
        body = json.dumps({"detail": BAD_PATH}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        prefix = "websocket.http" if scope["type"] == "websocket" else "http"
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get(
            "extensions", {}
        ):
            await send({"type": "websocket.close", "code": 1008, "reason": "bad path"})
            return
        await send({"type": f"{prefix}.response.start", "status": 400, "headers": headers})
        await send({"type": f"{prefix}.response.body", "body": body})


async def known_query_parameters(connection: HTTPConnection) -> None:
    """An app-wide dependency: refuse query parameters the matched endpoint does not declare.

    :raises RequestValidationError: naming the unknown parameters and the known ones.
    """
    route = connection.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if connection.scope["type"] != "http" or dependant is None:
        return
    known = {param.alias for param in dependant.query_params}
    unknown = sorted(set(connection.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no query parameters"
        raise RequestValidationError(
            [
                {
                    "type": "extra_forbidden",
                    "loc": ("query", name),
                    "msg": f"unknown query parameter; this endpoint takes {takes}",
                }  # no "input": a token put in the wrong place is not echoed
                for name in unknown[:5]
            ]
        )


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Any, error: HTTPException) -> None:
    body = json.dumps({"detail": error.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
