"""The request body limit: a body larger than ``max_body_bytes`` is refused with 413 before
it is read into memory (declared ``Content-Length``) or as soon as it grows past the limit
(chunked uploads)."""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException

__all__ = ["BodyLimitMiddleware", "body_too_large"]


def body_too_large(limit: int) -> HTTPException:
    return HTTPException(
        413,
        f"the request body is larger than {limit:,} bytes: send a smaller body "
        "(or raise TRAINBUS_MAX_BODY_BYTES)",
    )


class BodyLimitMiddleware:
    """Refuses HTTP request bodies over ``limit`` bytes with 413 (ASGI middleware)."""

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


def _content_length(scope: Any) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _refuse(send: Any, error: HTTPException) -> None:
    import json

    body = json.dumps({"detail": error.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})
