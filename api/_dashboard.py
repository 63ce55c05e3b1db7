"""The web dashboard: the page at ``/``, its assets under ``/dashboard/``, and metric series.

The page and its assets are public (they hold no data: the page asks for the API token and
sends it as a bearer header, and on WebSockets as a subprotocol). Everything the page needs
ships in this package (``api/dashboard/``), so it works with no network. Responses carry a
strict Content-Security-Policy: scripts and styles from this origin only, no inline script,
no eval, connections to this origin only, no framing.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Annotated, Any

import anyio
import orjson
import yaml
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from pydantic import StringConstraints

from trainbus.bus import Event
from trainbus.sdk import finite

from ._errors import NotFound, ServiceUnavailable
from ._schemas import JOB_ID_PATTERN, ErrorBody, ValidationErrorBody
from ._series import SeriesCache, downsample_min_max, source_types
from ._services import has_events, services_of

__all__ = ["CONTENT_SECURITY_POLICY", "public_paths", "router"]

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
_SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # the assets change with the package: revalidate, but allow the browser to keep them
    "Cache-Control": "no-cache",
}
_MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}
ASSET_PREFIX = "/dashboard/"


@dataclass(frozen=True)
class _Asset:
    body: bytes
    gzipped: bytes
    media_type: str
    etag: str


@cache
def _assets() -> dict[str, _Asset]:
    """The shipped files by their path under ``/dashboard/`` (read and compressed once)."""
    root = resources.files("trainbus.api") / "dashboard"
    found: dict[str, _Asset] = {}

    def walk(folder: Any, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
                continue
            suffix = entry.name[entry.name.rfind(".") :]
            if suffix not in _MEDIA_TYPES and entry.name != "LICENSE":
                continue
            body = entry.read_bytes()
            found[prefix + entry.name] = _Asset(
                body=body,
                gzipped=gzip.compress(body, compresslevel=9, mtime=0),
                media_type=_MEDIA_TYPES.get(suffix, "text/plain; charset=utf-8"),
                etag=f'"{hash(body) & 0xFFFFFFFFFFFF:x}"',
            )

    walk(root, "")
    return found


def public_paths() -> list[str]:
    """The paths served without the token: the page and each of its assets."""
    return ["/", *(ASSET_PREFIX + name for name in _assets())]


def _serve(request: Request, name: str) -> Response:
    asset = _assets().get(name)
    if asset is None:
        raise NotFound(f"the dashboard has no file {name!r}: open / for the dashboard")
    headers = {**_SECURITY_HEADERS, "ETag": asset.etag, "Vary": "Accept-Encoding"}
    if request.headers.get("if-none-match") == asset.etag:
        return Response(status_code=304, headers=headers)
    body = asset.body
    if "gzip" in request.headers.get("accept-encoding", ""):
        body = asset.gzipped
        headers["Content-Encoding"] = "gzip"
    return Response(body, media_type=asset.media_type, headers=headers)


router = APIRouter()


@router.get("/", include_in_schema=False)
async def dashboard_page(request: Request) -> Response:
    return _serve(request, "index.html")


@router.get("/dashboard/{name:path}", include_in_schema=False)
async def dashboard_asset(request: Request, name: str) -> Response:
    return _serve(request, name)


@dataclass
class _Cache:
    entries: SeriesCache = field(default_factory=SeriesCache)
    lock: anyio.Lock = field(default_factory=anyio.Lock)


def _series_cache(request: Request) -> _Cache:
    """The app's series cache (made on first use: it lives as long as the app)."""
    cache = getattr(request.app.state, "dashboard_series", None)
    if cache is None:
        cache = request.app.state.dashboard_series = _Cache()
    assert isinstance(cache, _Cache)
    return cache


_METRIC_PATTERN = r"^[A-Za-z0-9_./()@-]{1,100}$"
_METRIC_RE = re.compile(_METRIC_PATTERN)


_API_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API token"},
    422: {"model": ValidationErrorBody, "description": "Invalid parameters or spec text"},
}


@router.get(
    "/jobs/{job_id}/series",
    tags=["jobs"],
    summary="Metric series of a job",
    responses={
        **_API_RESPONSES,
        404: {"model": ErrorBody, "description": "No job with this id"},
        503: {"model": ErrorBody, "description": "The event store is not running"},
    },
)
async def job_series(
    request: Request,
    job_id: Annotated[str, Path(pattern=JOB_ID_PATTERN, description="The job's id")],
    metric: Annotated[
        list[Annotated[str, StringConstraints(pattern=_METRIC_PATTERN)]],
        Query(
            min_length=1,
            max_length=8,
            description="Metrics to return (default 'loss'): 'loss' and 'lr' (every batch), an "
            "epoch metric "
            "('val_loss', 'val_accuracy', ...), or a resource figure ('process_cpu_percent', "
            "'system_cpu_percent', 'rss_bytes'; job '_server')",
            examples=["loss"],
        ),
    ] = ["loss"],  # noqa: B006 - FastAPI copies a query default per request
    points: Annotated[
        int, Query(ge=4, le=20_000, description="At most this many points per metric")
    ] = 2000,
) -> dict[str, Any]:
    """Each metric's points ``x`` (the step; for resources the time), ``y`` and ``epoch``, at
    most ``points`` of them (min and max per bucket), computed from the stored events up to
    ``last_seq``; follow the job's event stream from ``after_seq=last_seq`` to extend them."""
    for name in metric:
        if not _METRIC_RE.match(name):
            raise RequestValidationError(
                [
                    {
                        "type": "string_pattern_mismatch",
                        "loc": ("query", "metric"),
                        "msg": f"a metric name matches {_METRIC_PATTERN}",
                    }
                ]
            )
    services = services_of(request)
    if not await has_events(services, job_id):
        await services.jobs.get(job_id)  # raises the job-not-found error
    if services.history is None:
        raise ServiceUnavailable("the event store is not running")
    last_seq = services.bus.last_seq(job_id)
    await services.history.wait_for(job_id, last_seq)
    if last_seq <= 0:
        last_seq = await services.history.last_seq(job_id)
    cache = _series_cache(request)
    names = list(dict.fromkeys(metric))
    series: dict[str, Any] = {}
    async with cache.lock:
        cached = {name: cache.entries.get(job_id, name, last_seq) for name in names}
        after = min((0 if entry is None else entry.last_seq) for entry in cached.values())
        events: list[Event] = []
        if after < last_seq:
            wanted = frozenset().union(*(source_types(name) for name in names))
            events = await services.history.read(job_id, after_seq=after, types=wanted)
            events = [event for event in events if event.seq <= last_seq]
        for name in names:
            full = cache.entries.extend(job_id, name, events, last_seq)
            series[name] = {**downsample_min_max(full, points).to_dict(), "total": len(full.y)}
    answer: dict[str, Any] = finite({"job_id": job_id, "last_seq": last_seq, "series": series})
    return answer


_SPEC_TOO_DEEP = 64


class _SpecLoader(yaml.SafeLoader):
    """YAML without aliases: a few bytes of nested aliases expand to gigabytes of JSON."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a job spec", event.start_mark
            )
        return super().compose_node(parent, index)


@router.post(
    "/specs/parse",
    tags=["jobs"],
    summary="Read a job spec written in YAML or JSON",
    responses=_API_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"text/plain": {"schema": {"type": "string"}, "example": "epochs: 3\n"}},
        }
    },
)
async def parse_spec(request: Request) -> Response:
    """The spec in the body (YAML, of which JSON is a subset) as a JSON object, ready to
    ``POST /jobs``; a 422 names the line of a syntax error. Nothing is validated or stored."""
    raw = await request.body()
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise _spec_error("the spec is not UTF-8 text", None) from None
    try:
        spec = yaml.load(text, Loader=_SpecLoader)  # a SafeLoader without aliases
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        line = None if mark is None else mark.line + 1
        raise _spec_error(f"not valid YAML or JSON: {error.problem or error}", line) from None
    except yaml.YAMLError as error:
        raise _spec_error(f"not valid YAML or JSON: {error}", None) from None
    except RecursionError:
        raise _spec_error(f"the spec nests deeper than {_SPEC_TOO_DEEP} levels", None) from None
    if not isinstance(spec, dict):
        raise _spec_error("a job spec is a mapping of fields (name, model, dataset, ...)", 1)
    try:
        body = orjson.dumps(finite(jsonable_encoder(spec)))
    except (TypeError, ValueError, RecursionError):
        # lone surrogates, binary values, keys that are not text: nothing a spec holds
        raise _spec_error("the spec holds values JSON cannot carry", None) from None
    return Response(body, media_type="application/json")


def _spec_error(message: str, line: int | None) -> RequestValidationError:
    item: dict[str, Any] = {"type": "spec_syntax", "loc": ("body",), "msg": message}
    if line is not None:
        item["line"] = line
    return RequestValidationError([item])
