"""The one place that maps exceptions to HTTP statuses; every error body is
``{"detail": "<what went wrong and what to fix>"}`` (422s keep FastAPI's field list).

Hierarchy of the API's own errors::

    ApiError
    ├── NotFound            an id or name the server does not know (404)
    ├── Conflict            the job's state does not allow the request (409)
    ├── InvalidRequest      a request that is well-formed JSON but cannot be honoured (422)
    └── ServiceUnavailable  the server is starting or shutting down (503)

Exceptions of the other packages are mapped by class in :data:`STATUSES`.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from trainbus.bus import BusClosed, ControlError, UnknownEventName
from trainbus.subscribers import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointNotFound,
    UnsafeCheckpoint,
)
from trainbus.worker import IllegalTransition, JobNotFound, KeyConflict, ManagerClosed, SpecError

__all__ = [
    "ApiError",
    "Conflict",
    "InvalidRequest",
    "NotFound",
    "ServiceUnavailable",
    "install_error_handlers",
    "status_for",
    "without_paths",
]

logger = logging.getLogger(__name__)


class ApiError(Exception):
    """Base class of the API's own errors; ``status`` is the HTTP status it maps to."""

    status = 500

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NotFound(ApiError):
    """Raised when a job id, checkpoint name or other identifier is unknown."""

    status = 404


class Conflict(ApiError):
    """Raised when the job's state does not allow the request (pause a completed job)."""

    status = 409


class InvalidRequest(ApiError):
    """Raised when a request is well-formed but cannot be honoured as asked."""

    status = 422


class ServiceUnavailable(ApiError):
    """Raised while the server is starting up or shutting down."""

    status = 503


STATUSES: dict[type[BaseException], int] = {
    ApiError: 500,  # each subclass carries its own
    BusClosed: 503,
    ControlError: 409,
    UnknownEventName: 422,
    JobNotFound: 404,
    IllegalTransition: 409,
    KeyConflict: 409,
    SpecError: 422,
    ManagerClosed: 503,
    CheckpointNotFound: 404,
    CheckpointCorrupt: 409,
    UnsafeCheckpoint: 409,
    CheckpointError: 409,
}
"""The HTTP status of each exception class of the project (the most specific listed class of
an exception wins)."""


def status_for(error: BaseException, statuses: Mapping[type[BaseException], int]) -> int | None:
    """The status for ``error``: its most specific class listed in ``statuses``."""
    if isinstance(error, ApiError):
        return error.status
    for cls in type(error).__mro__:
        if cls in statuses:
            return statuses[cls]
    return None


_QUOTED_ABSOLUTE_PATH = re.compile(r"""(['"])(/[^'"]*)\1""")


def without_paths(text: str, folders: Iterable[Path] = ()) -> str:
    """``text`` with absolute paths cut to their last part: an error says which file is wrong
    (``'state.pt'``), not where the server keeps it. Quoted absolute paths (what ``OSError``
    prints) and unquoted ones under ``folders`` (the data folder) are cut."""
    text = _QUOTED_ABSOLUTE_PATH.sub(lambda m: m[1] + PurePath(m[2]).name + m[1], text)
    for folder in sorted({str(f) for f in folders if str(f) not in ("", "/", ".")}, key=len)[::-1]:
        pattern = re.escape(folder) + r"""(/[^\s'",;:]*)?"""
        text = re.sub(pattern, lambda m: PurePath(m[0]).name if m[1] else "the data folder", text)
    return text


def _detail(error: BaseException) -> str:
    detail = getattr(error, "detail", None)
    if isinstance(detail, str) and detail:
        return printable(detail)
    text = str(error)
    if len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    return printable(text) or type(error).__name__


_ECHO_CHARACTERS = 200
_ECHO_ITEMS = 20
_ECHO_DEPTH = 4
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_LISTED_ERRORS = 20
"""Most field errors a 422 lists; the rest are counted (a body of 100,000 unknown keys
would otherwise be answered with megabytes)."""


def printable(text: str) -> str:
    """``text`` encodable as UTF-8: a lone surrogate (``"\\ud800"`` in JSON) becomes U+FFFD."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def echoed_input(value: Any, depth: int = 0) -> Any:
    """What a 422 shows of a refused input: JSON-safe (NaN and infinities as strings) and
    small (long strings cut, big containers elided), so a hostile body is never echoed whole."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        value = printable(value)
        return value if len(value) <= _ECHO_CHARACTERS else value[:_ECHO_CHARACTERS] + "..."
    if isinstance(value, bool | int | float) or value is None:
        return value
    if depth >= _ECHO_DEPTH:
        return "..."
    if isinstance(value, Mapping):
        items = list(value.items())
        shown = {
            printable(str(k)[:_ECHO_CHARACTERS]): echoed_input(v, depth + 1)
            for k, v in items[:_ECHO_ITEMS]
        }
        if len(items) > _ECHO_ITEMS:
            shown["..."] = f"{len(items) - _ECHO_ITEMS} more"
        return shown
    if isinstance(value, list | tuple):
        shown_items = [echoed_input(item, depth + 1) for item in value[:_ECHO_ITEMS]]
        if len(value) > _ECHO_ITEMS:
            shown_items.append(f"... {len(value) - _ECHO_ITEMS} more")
        return shown_items
    return echoed_input(str(value), depth)


def _bounded_error(item: Mapping[str, Any]) -> dict[str, Any]:
    bounded = dict(item)
    for key in ("input", "ctx"):
        if key in bounded:
            bounded[key] = echoed_input(bounded[key])
    message = bounded.get("msg")
    if isinstance(message, str):
        message = printable(message)
        bounded["msg"] = message if len(message) <= 1000 else message[:1000] + "..."
    # a location holds the keys the client sent: as hostile as the input itself
    bounded["loc"] = [
        part if isinstance(part, int) else printable(str(part))[:_ECHO_CHARACTERS]
        for part in bounded.get("loc", ())
    ]
    return bounded


def _data_folders(request: Request) -> list[Path]:
    settings = getattr(request.app.state, "settings", None)
    data_dir = getattr(settings, "data_dir", None)
    if not isinstance(data_dir, Path):
        return []
    return [data_dir.absolute(), data_dir.resolve()]


def install_error_handlers(app: FastAPI) -> None:
    """Install the handlers that answer each exception of :data:`STATUSES` with its status."""
    table = STATUSES

    async def mapped(request: Request, error: Exception) -> JSONResponse:
        status = status_for(error, table) or 500
        if status >= 500 and status != 503:
            logger.error("%s %s failed: %r", request.method, request.url.path, error)
            return JSONResponse(
                {"detail": "internal error; the server log has the details"}, status_code=500
            )
        headers = {"Retry-After": "5"} if status == 503 else None
        detail = without_paths(_detail(error), _data_folders(request))
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)

    for cls in table:
        if issubclass(cls, Exception):
            app.add_exception_handler(cls, mapped)

    async def validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        found = error.errors()
        errors = [_bounded_error(item) for item in found[:MAX_LISTED_ERRORS]]
        errors = jsonable_encoder(errors, custom_encoder={Exception: lambda e: printable(str(e))})
        fields = ", ".join(
            ".".join(str(part) for part in item.get("loc", ())) for item in errors[:5]
        )
        body: dict[str, Any] = {"detail": errors, "message": f"invalid request: fix {fields}"}
        if len(found) > MAX_LISTED_ERRORS:
            body["message"] += f" ({len(found):,} errors in all; the first {len(errors)} listed)"
            body["errors_not_listed"] = len(found) - len(errors)
        return JSONResponse(body, status_code=422)

    app.add_exception_handler(RequestValidationError, validation)

    async def http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        detail: Any = error.detail
        if error.status_code == 400 and detail == "There was an error parsing the body":
            detail = (
                "the body could not be parsed: send one JSON object (UTF-8, nested at most a "
                "few hundred levels deep) with Content-Type: application/json"
            )
        elif error.status_code == 404 and detail == "Not Found":
            detail = f"no such endpoint: {request.method} {request.url.path} (see /docs)"
        elif error.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}"
        return JSONResponse(
            {"detail": detail}, status_code=error.status_code, headers=error.headers
        )

    app.add_exception_handler(StarletteHTTPException, http_error)
