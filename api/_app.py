"""The app factory: ``create_app(settings)`` wires the bus, the live hub, the job manager and
the default subscribers together, and shuts them down in order.

Start-up: the bus, the WebSocket hub, then the runtime (event store, Prometheus exporter,
resource monitor, job manager). Shutdown (also on SIGTERM, through uvicorn): stop accepting
jobs, let the runtime checkpoint and pause running jobs (they come back ``interrupted``) and
flush the store, close the WebSocket streams, close the bus.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import anyio
from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry

from trainbus.bus import EventBus

from ._auth import (
    HostMiddleware,
    HostPolicy,
    OriginPolicy,
    TokenMiddleware,
    announce_generated_token,
    ensure_token,
    write_token_file,
)
from ._connections import ConnectionGuard
from ._dashboard import public_paths as dashboard_paths
from ._dashboard import router as dashboard_router
from ._errors import install_error_handlers
from ._history import EventHistory, EventSource, seq_guard_of
from ._hub import EventHub
from ._limits import BodyLimitMiddleware, PathGuardMiddleware, known_query_parameters
from ._metrics import ConnectionCollector, HubCollector
from ._routes_jobs import router as jobs_router
from ._routes_runs import router as runs_router
from ._routes_system import router as system_router
from ._services import JobService, Services
from ._settings import Settings, is_loopback_host
from ._websocket import router as websocket_router
from ._worker_route import router as worker_router

__all__ = ["Runtime", "RuntimeFactory", "create_app"]

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Run, watch and steer PyTorch training jobs.

Every endpoint but `/healthz`, these docs (`/docs`, `/redoc`, `/openapi.json`), the
dashboard's page (`/`) and its files, and `/metrics` (unless configured otherwise) needs the
API token: `Authorization: Bearer <token>`.
Here, press **Authorize** and paste the token to try the endpoints out. WebSocket clients
send the same header, or (browsers) offer the subprotocols `trainbus` and
`trainbus.bearer.<token>`.

The server answers only to its own host names (IP addresses, `localhost`, the bind address
and `TRAINBUS_ALLOWED_HOSTS`; others get 400, against DNS rebinding), refuses state-changing
requests and WebSockets from an `Origin` outside `TRAINBUS_ALLOWED_ORIGINS` (403), and bodies
over `TRAINBUS_MAX_BODY_BYTES` (413).

Live events: `ws://HOST/jobs/{id}/events/ws?after_seq=N&types=a,b` (replay from the store,
then live; neither gap nor duplicate; closed with 4404 when the job is deleted) and
`ws://HOST/events/ws` (every job, live only: no replay, no `after_seq`). Each message
is one JSON event `{"job_id", "seq", "type", "time", "data"}` or an array of them. A client
that falls too far behind, or does not take a message within `TRAINBUS_WS_SEND_TIMEOUT`
(replays included), is closed with code 4008 (the reason names the `after_seq` to reconnect
with), or dropped if it does not read the close frame either.

Connections that send no complete request within `TRAINBUS_REQUEST_TIMEOUT` are closed.
"""


@dataclass
class Runtime:
    """What the job side of the server provides to the routes."""

    jobs: JobService
    history: EventSource | None = None
    render_metrics: Callable[[], bytes] | None = None
    ready_checks: dict[str, Callable[[], Any]] = field(default_factory=dict)
    metrics_registry: CollectorRegistry | None = None
    """Where the API registers its own metrics (rendered by ``render_metrics``)."""


RuntimeFactory = Callable[[Settings, EventBus], AbstractAsyncContextManager[Runtime]]
"""Builds the runtime on a running bus and tears it down on exit (dependency injection)."""


def _default_runtime(settings: Settings, bus: EventBus) -> AbstractAsyncContextManager[Runtime]:
    from ._runtime import default_runtime

    return default_runtime(settings, bus)


def create_app(
    settings: Settings | None = None, *, runtime: RuntimeFactory | None = None
) -> FastAPI:
    """Build the trainbus FastAPI app.

    :param settings: the configuration (default: read from the environment now). Without a
        token one is generated and written to the data folder (never printed).
    :param runtime: builds the job side on the bus (default: the worker's job manager with
        the event store, Prometheus exporter and resource monitor).
    :raises ValueError: for a non-loopback host without an explicit token.
    """
    settings, generated = ensure_token(settings if settings is not None else Settings())
    assert settings.token is not None
    factory = runtime or _default_runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if generated:
            assert settings.token is not None
            path = write_token_file(settings.data_dir, settings.token)
            announce_generated_token(path)
        async with EventBus() as bus, anyio.create_task_group() as group:
            hub = EventHub(
                bus,
                buffer_size=settings.hub_buffer_size,
                batch_interval=settings.ws_batch_interval,
            )
            await group.start(hub.run)
            group.start_soon(hub.let_go_stalled_senders, settings.ws_send_timeout)
            try:
                async with factory(settings, bus) as built:
                    hub.seq_guard = seq_guard_of(built.history)
                    services = Services(
                        settings=settings,
                        bus=bus,
                        hub=hub,
                        jobs=built.jobs,
                        history=None
                        if built.history is None
                        else EventHistory(
                            built.history, catch_up_timeout=settings.store_catch_up_timeout
                        ),
                        render_metrics=built.render_metrics,
                        ready_checks=built.ready_checks,
                    )
                    app.state.services = services
                    app.state.drain_jobs = getattr(built.jobs, "drain", None)
                    collectors: list[HubCollector | ConnectionCollector] = [HubCollector(hub)]
                    guard = getattr(app.state, "connections", None)
                    if isinstance(guard, ConnectionGuard):  # set by uvicorn_config
                        collectors.append(ConnectionCollector(guard))
                    if built.metrics_registry is not None:
                        for collector in collectors:
                            built.metrics_registry.register(collector)
                    try:
                        yield
                    finally:
                        services.accepting = False
                        services.shutting_down = True
                        logger.info("trainbus: shutting down")
                        if built.metrics_registry is not None:
                            for collector in collectors:
                                built.metrics_registry.unregister(collector)
            finally:
                hub.close()
        app.state.services = None

    app = FastAPI(
        title="trainbus",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        dependencies=[Depends(known_query_parameters)],
    )
    app.state.settings = settings
    app.state.services = None
    install_error_handlers(app)
    app.include_router(system_router)
    app.include_router(jobs_router)
    app.include_router(websocket_router)
    app.include_router(runs_router)
    app.include_router(worker_router)
    app.include_router(dashboard_router)
    origins = OriginPolicy(settings.allowed_origins)
    exempt = [*PUBLIC_PATHS, *([] if settings.metrics_require_token else ["/metrics"])]
    exempt += dashboard_paths()  # the page and its assets hold no data; the API asks the token
    hosts = HostPolicy(settings.allowed_hosts, settings.host)
    app.add_middleware(
        TokenMiddleware,
        token=settings.token,
        origins=origins,
        exempt_paths=exempt,
        own_origin=not hosts.allow_any,  # the dashboard's own origin, its Host checked
    )
    app.add_middleware(
        CORSMiddleware,
        allow_origins=["*"] if origins.allow_any else list(origins.origins),
        # allowed loopback origins match on any port, as for WebSockets
        allow_origin_regex=_loopback_origin_regex(origins),
        allow_methods=["GET", "POST", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Location"],
    )
    # outermost: a foreign Host (DNS rebinding) is refused before anything else looks at it
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_body_bytes)
    app.add_middleware(PathGuardMiddleware)
    app.add_middleware(HostMiddleware, policy=hosts)
    _add_security_scheme(app)
    return app


def _loopback_origin_regex(origins: OriginPolicy) -> str | None:
    hosts = sorted(
        {
            re.escape(urlsplit(origin).netloc)
            for origin in origins.origins
            if is_loopback_host(urlsplit(origin).hostname or "") and urlsplit(origin).port is None
        }
    )
    return rf"https?://({'|'.join(hosts)})(:\d+)?" if hosts else None


PUBLIC_PATHS = ("/healthz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
"""Paths a browser opens without the token: the API's description holds no secrets."""

_ERROR_CONTENT = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
_UNPARSABLE_BODY = {"description": "The body is not parsable JSON", "content": _ERROR_CONTENT}
_BAD_PATH = {
    "description": "The path holds a '.' or '..' segment, a NUL byte or a backslash",
    "content": _ERROR_CONTENT,
}
_BODY_TOO_LARGE = {"description": "The body is over the size limit", "content": _ERROR_CONTENT}


def _add_security_scheme(app: FastAPI) -> None:
    """Document the bearer token in the OpenAPI document (the middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        components.setdefault("securitySchemes", {})["bearer"] = {
            "type": "http",
            "scheme": "bearer",
            "description": "The API token printed at start-up (or TRAINBUS_TOKEN)",
        }
        schema["security"] = [{"bearer": []}]
        for by_method in schema.get("paths", {}).values():
            for operation in by_method.values():
                if any(param.get("in") == "path" for param in operation.get("parameters", ())):
                    operation["responses"].setdefault("400", _BAD_PATH)
                if "requestBody" in operation:
                    operation["responses"].setdefault("400", _UNPARSABLE_BODY)
                    operation["responses"].setdefault("413", _BODY_TOO_LARGE)
        for path in ("/healthz", "/metrics"):
            for operation in schema.get("paths", {}).get(path, {}).values():
                operation["security"] = [] if path == "/healthz" else [{}, {"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
