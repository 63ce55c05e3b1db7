"""The token guards every route (generated from ``app.routes``); Origins are checked."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from fastapi.routing import APIWebSocketRoute
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from api import Settings, create_app
from api._auth import OriginPolicy, ensure_token

from .fakes import FakeJobs
from .server import LiveServer

EXEMPT = {"/healthz", "/metrics"}
BAD_CREDENTIALS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token-0123456789"},
    {"Authorization": "Basic dGVzdDp0ZXN0"},
    {"Authorization": "Bearer"},
    {"Authorization": "bearer test-token-0123456789x"},
]


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "fake-1", path)


def _flatten(routes: list[Any]) -> list[Any]:
    """Routes, with included routers (FastAPI keeps them as wrappers) opened up."""
    flat: list[Any] = []
    for route in routes:
        included = getattr(route, "original_router", None)
        if included is not None:
            flat.extend(_flatten(list(included.routes)))
        else:
            flat.append(route)
    return flat


def _routes() -> list[tuple[str, str]]:
    app = create_app(Settings(token="x" * 16), runtime=lambda s, b: None)  # type: ignore[arg-type,return-value]
    cases: list[tuple[str, str]] = []
    for route in _flatten(list(app.routes)):
        if isinstance(route, APIWebSocketRoute | WebSocketRoute):
            cases.append(("WS", route.path))
        elif isinstance(route, Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    cases.append((method, route.path))
    return cases


ROUTES = _routes()


def test_every_kind_of_route_is_covered() -> None:
    kinds = {method for method, _ in ROUTES}
    assert {"GET", "POST", "DELETE", "WS"} <= kinds
    assert ("POST", "/jobs") in ROUTES
    assert ("GET", "/openapi.json") in ROUTES


@pytest.mark.parametrize(("method", "path"), ROUTES, ids=[f"{m} {p}" for m, p in ROUTES])
async def test_route_refuses_missing_or_wrong_token(
    transport_server: LiveServer, fake_jobs: FakeJobs, method: str, path: str
) -> None:
    fake_jobs.add("fake-1")
    before = set(fake_jobs.records)
    url = _concrete(path)
    for headers in BAD_CREDENTIALS:
        if method == "WS":
            with pytest.raises(InvalidStatus) as refused:
                async with connect(
                    transport_server.ws_url + url,
                    additional_headers=headers,
                    proxy=None,
                    subprotocols=["trainbus", "trainbus.bearer.wrong-token"],  # type: ignore[list-item]
                ):
                    pass
            assert refused.value.response.status_code == 401
        else:
            async with httpx.AsyncClient(base_url=transport_server.url) as client:
                response = await client.request(method, url, headers=headers, json={"a": 1})
            if path in EXEMPT:
                assert response.status_code < 400
            else:
                assert response.status_code == 401, response.text
                assert "Bearer" in response.json()["detail"]
                assert response.headers["www-authenticate"] == "Bearer"
    assert set(fake_jobs.records) == before, "a refused request created a job"


async def test_browser_subprotocol_token_is_accepted_and_only_trainbus_is_echoed(
    transport_server: LiveServer,
) -> None:
    async with connect(
        transport_server.ws_url + "/events/ws",
        subprotocols=["trainbus", f"trainbus.bearer.{transport_server.token}"],  # type: ignore[list-item]
        origin="http://localhost:5173",  # type: ignore[arg-type]
        proxy=None,
    ) as socket:
        assert socket.subprotocol == "trainbus"


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://127.0.0.1.evil.example", "file://"]
)
async def test_hostile_origin_is_refused_even_with_the_token(
    transport_server: LiveServer, origin: str
) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            transport_server.ws_url + "/events/ws",
            additional_headers=transport_server.headers,
            origin=origin,  # type: ignore[arg-type]
            proxy=None,
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_good_token_is_accepted(transport_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=transport_server.url) as client:
        response = await client.get("/jobs", headers=transport_server.headers)
    assert response.status_code == 200


def test_origin_policy() -> None:
    policy = OriginPolicy(["http://localhost", "https://dash.example.com"])
    assert policy.allows(None)
    assert policy.allows("http://localhost:3000")
    assert policy.allows("https://dash.example.com")
    assert not policy.allows("https://dash.example.com:8443")
    assert not policy.allows("http://dash.example.com")
    assert not policy.allows("http://localhost.evil.example")


def test_non_loopback_bind_needs_an_explicit_token() -> None:
    with pytest.raises(ValueError, match="TRAINBUS_TOKEN"):
        ensure_token(Settings(host="0.0.0.0"))
    settings, generated = ensure_token(Settings(host="127.0.0.1"))
    assert generated and settings.token is not None
    assert len(settings.token.get_secret_value()) >= 32
    _, generated = ensure_token(Settings(host="0.0.0.0", token="s3cret-token-value"))
    assert not generated


def test_settings_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINBUS_TOKEN", "from-the-env-123")
    monkeypatch.setenv("TRAINBUS_MAX_RUNNING_JOBS", "3")
    monkeypatch.setenv("TRAINBUS_ALLOWED_ORIGINS", '["https://a.example"]')
    settings = Settings()
    assert settings.token is not None
    assert settings.token.get_secret_value() == "from-the-env-123"
    assert settings.max_running_jobs == 3
    assert settings.allowed_origins == ["https://a.example"]
    assert "from-the-env-123" not in repr(settings)
