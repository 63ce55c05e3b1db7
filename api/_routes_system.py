"""System routes: liveness, readiness, Prometheus metrics and the model/dataset registry."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from ._errors import ServiceUnavailable
from ._schemas import ErrorBody, Health, Readiness, RegistryBody
from ._services import services_of

__all__ = ["router"]

router = APIRouter(tags=["system"])


@router.get("/healthz", response_model=Health, summary="Liveness")
async def healthz() -> dict[str, str]:
    """200 while the process serves requests (no token needed)."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={
        401: {"model": ErrorBody},
        503: {"model": Readiness, "description": "Starting or shutting down"},
    },
    summary="Readiness",
)
async def readyz(request: Request) -> JSONResponse:
    """200 when the server accepts jobs; 503 while starting or shutting down."""
    services = getattr(request.app.state, "services", None)
    if services is None:
        return JSONResponse({"status": "starting", "checks": {}}, status_code=503)
    checks: dict[str, Any] = {"bus": not services.bus.closed}
    for name, check in services.ready_checks.items():
        try:
            checks[name] = check()
        except Exception as error:  # a failing check makes the server unready, not broken
            checks[name] = f"failed: {error}"
    if services.shutting_down or not services.accepting:
        return JSONResponse({"status": "shutting_down", "checks": checks}, status_code=503)
    ok = all(value is True or isinstance(value, dict) for value in checks.values())
    return JSONResponse(
        {"status": "ready" if ok else "starting", "checks": checks},
        status_code=200 if ok else 503,
    )


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"},
        401: {"model": ErrorBody},
    },
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    """Metrics in the Prometheus text exposition format."""
    services = services_of(request)
    if services.render_metrics is None:
        raise ServiceUnavailable("the metrics exporter is not running")
    return Response(services.render_metrics(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/registry",
    response_model=RegistryBody,
    responses={401: {"model": ErrorBody}},
    summary="Models, datasets and programs",
)
async def registry(request: Request) -> dict[str, Any]:
    """The models, datasets and registered programs a job spec may name, with their
    parameter schemas."""
    return services_of(request).jobs.registry()
