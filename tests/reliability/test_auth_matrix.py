"""The auth exposure matrix: every HTTP and WebSocket route of the app,
enumerated from ``app.routes``, against a real server with a real job in it.

Rows: each route. Columns: no token, wrong tokens, the token in the wrong place, a hostile
``Origin`` (WebSockets and state-changing requests), a foreign ``Host`` (DNS rebinding).
Expected: 401 / 403 / 400, a body that is only ``{"detail": ...}`` and gives nothing away,
and no state changed. The same request with the token is the control: it gets past the guard.
``PUBLIC`` lists the routes that need no token, by design; a route missing from ``EXPECTED``
fails the suite, so a new route cannot be forgotten.
"""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.routing import APIWebSocketRoute
from starlette.routing import Route, WebSocketRoute
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import Settings, create_app
from trainbus.api._auth import HostPolicy

from .conftest import record

DOCS = {
    ("GET", "/openapi.json"),
    ("GET", "/docs"),
    ("GET", "/docs/oauth2-redirect"),
    ("GET", "/redoc"),
}
"""The API's description, for browsers: it holds no secrets."""
DASHBOARD = {("GET", "/"), ("GET", "/dashboard/{name:path}")}
"""The dashboard's page and the files it ships: no data (the page asks for the token)."""
PUBLIC = {("GET", "/healthz"), ("GET", "/metrics"), *DOCS, *DASHBOARD}
"""No token needed, by design: liveness for orchestrators, metrics for Prometheus (unless
``metrics_require_token``), the docs and the dashboard. Nothing else."""

EXPECTED: dict[tuple[str, str], str] = {
    ("GET", "/"): "public",
    ("GET", "/openapi.json"): "public",
    ("GET", "/docs"): "public",
    ("GET", "/docs/oauth2-redirect"): "public",
    ("GET", "/redoc"): "public",
    ("GET", "/healthz"): "public",
    ("GET", "/readyz"): "read",
    ("GET", "/metrics"): "public",
    ("GET", "/registry"): "read",
    ("POST", "/jobs"): "change",
    ("GET", "/jobs"): "read",
    ("GET", "/jobs/{job_id}"): "read",
    ("POST", "/jobs/{job_id}/pause"): "change",
    ("POST", "/jobs/{job_id}/resume"): "change",
    ("POST", "/jobs/{job_id}/stop"): "change",
    ("POST", "/jobs/{job_id}/save"): "change",
    ("POST", "/jobs/{job_id}/set_lr"): "change",
    ("DELETE", "/jobs/{job_id}"): "change",
    ("GET", "/jobs/{job_id}/events"): "read",
    ("GET", "/jobs/{job_id}/checkpoints"): "read",
    ("GET", "/jobs/{job_id}/checkpoints/{name}"): "read",
    ("GET", "/jobs/{job_id}/log"): "read",
    ("WS", "/jobs/{job_id}/events/ws"): "stream",
    ("WS", "/events/ws"): "stream",
    ("GET", "/dashboard/{name:path}"): "public",
    ("GET", "/jobs/{job_id}/series"): "read",
    ("POST", "/specs/parse"): "change",
    ("PUT", "/runs/{run_id}"): "change",
    ("WS", "/jobs/{job_id}/worker"): "worker",
}
"""Every route and what it does; the test fails when the app has a route not listed here.
``worker``: a job's worker endpoint, which takes that job's own credential and never the API
token."""

RUN_ID = "matrix-run"
"""An SDK run made by the fixture: ``PUT /runs/{run_id}`` rows attach to it, not make jobs."""

WRONG_TOKENS: list[dict[str, str]] = [
    {},
    {"Authorization": "Bearer wrong-token-0123456789"},
    {"Authorization": "Bearer"},
    {"Authorization": "Basic dGVzdDp0ZXN0"},
    {"Authorization": "bearer test-token-0123456789x"},
    {"Authorization": "Bearer test-token-012345678"},  # a prefix of the real one
]

HOSTILE_ORIGINS = ["http://evil.example", "null", "http://127.0.0.1.evil.example", "file://"]
FOREIGN_HOSTS = ["evil.example", "evil.example:80", "127.0.0.1.evil.example", "localhost.evil"]


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


def app_routes(settings: Settings) -> list[tuple[str, str]]:
    """Every (method, path) the app serves; ``WS`` for WebSocket routes."""
    app = create_app(settings)
    found: list[tuple[str, str]] = []
    for route in _flatten(list(app.routes)):
        if isinstance(route, APIWebSocketRoute | WebSocketRoute):
            found.append(("WS", route.path))
        elif isinstance(route, Route):
            found.extend(
                (method, route.path) for method in sorted(route.methods or ()) if method != "HEAD"
            )
    return found


@dataclass
class Matrix:
    server: LiveServer
    client: httpx.Client
    job_id: str
    checkpoint: str

    def path(self, method: str, template: str) -> str:
        # DELETE with the token would remove the job the other rows need: aim it elsewhere
        job_id = "no-such-job" if method == "DELETE" else self.job_id
        path = template.replace("{job_id}", job_id).replace("{name}", self.checkpoint)
        path = path.replace("{run_id}", RUN_ID)
        return path.replace("{name:path}", "app.js")

    def http(
        self, method: str, path: str, headers: dict[str, str], **kwargs: Any
    ) -> httpx.Response:
        return self.client.request(method, path, headers=headers, **kwargs)

    def job_count(self) -> int:
        response = self.http("GET", "/jobs", self.server.headers)
        return int(response.json()["total"])


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    settings = make_settings(tmp_path_factory.mktemp("data"), resource_interval_seconds=60.0)
    with run_server(create_app(settings), settings) as server:
        spec = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1}
        created = httpx.post(server.url + "/jobs", json=spec, headers=server.headers).json()
        stop_at = time.monotonic() + 60
        while (
            httpx.get(f"{server.url}/jobs/{created['id']}", headers=server.headers).json()["state"]
            != "completed"
        ):
            assert time.monotonic() < stop_at
            time.sleep(0.05)  # polling interval, bounded by the deadline
        attached = httpx.put(f"{server.url}/runs/{RUN_ID}", json={}, headers=server.headers)
        assert attached.status_code == 201, attached.text
        listed = httpx.get(
            f"{server.url}/jobs/{created['id']}/checkpoints", headers=server.headers
        ).json()
        with httpx.Client(base_url=server.url, timeout=30) as client:
            yield Matrix(server, client, created["id"], listed[0]["name"])


def _refusal(body: bytes, matrix: Matrix) -> str:
    """The refusal's detail; fails if the body carries anything more."""
    parsed = json.loads(body)
    assert set(parsed) == {"detail"}, parsed
    assert matrix.job_id not in body.decode(), "a refusal named a job"
    assert matrix.server.token not in body.decode()
    return str(parsed["detail"])


def _raw_handshake(matrix: Matrix, path: str, extra: dict[str, str]) -> tuple[int, bytes]:
    """A WebSocket handshake with headers set byte for byte (``Host`` included)."""
    host, port = matrix.server.url.removeprefix("http://").split(":")
    headers = {
        "Host": f"{host}:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version": "13",
        **extra,
    }
    request = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        connection.sendall((request + "\r\n").encode())
        received = b""
        while b"\r\n\r\n" not in received:
            received += connection.recv(65536)
        head, _, body = received.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = re.search(rb"(?im)^content-length: *(\d+)", head)
        while status != 101 and length is not None and len(body) < int(length.group(1)):
            body += connection.recv(65536)
    return status, body


def test_every_route_is_in_the_matrix(matrix: Matrix) -> None:
    routes = app_routes(Settings(token="x" * 16))
    assert sorted(set(routes)) == sorted(EXPECTED), "add the new route to EXPECTED"
    assert {route for route, kind in EXPECTED.items() if kind == "public"} == PUBLIC


@pytest.mark.parametrize(
    ("method", "template"), sorted(EXPECTED), ids=[f"{m} {p}" for m, p in sorted(EXPECTED)]
)
async def test_route_without_the_token_in_its_place_is_refused(
    matrix: Matrix, method: str, template: str
) -> None:
    """No token, wrong tokens, and the right token where the server does not look for it."""
    path = matrix.path(method, template)
    token = matrix.server.token
    misplaced: list[tuple[dict[str, str], str]] = [
        ({"X-API-Key": token}, ""),
        ({"Authorization": f"Token {token}"}, ""),
        ({"Authorization": token}, ""),
        ({"Cookie": f"token={token}; trainbus_token={token}"}, ""),
        ({}, f"?token={token}&access_token={token}"),
        ({"Sec-WebSocket-Protocol": f"trainbus, trainbus.bearer.{token}"}, ""),
    ]
    jobs_before = matrix.job_count()
    refused = 0
    body = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1}
    cases = [(headers, "") for headers in WRONG_TOKENS] + misplaced
    if EXPECTED[(method, template)] == "worker":
        # only the job's own credential opens it: the API token is no better than a wrong one
        for headers, _ in [*cases, (matrix.server.headers, "")]:
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(
                    matrix.server.ws_url + path, additional_headers=headers, proxy=None
                ):
                    pass
            assert refusal.value.response.status_code == 403
            assert "credential" in _refusal(refusal.value.response.body or b"{}", matrix)
            refused += 1
    elif method == "WS":
        # The browser subprotocol is the right place on a WebSocket: instead of the token
        # there, it offers a wrong one with every case, then an empty one on its own.
        attempts = [
            (headers, query, "trainbus.bearer.wrong-token")
            for headers, query in cases
            if "Sec-WebSocket-Protocol" not in headers
        ]
        attempts.append(({}, "", "trainbus.bearer."))
        assert len(attempts) == len(cases)
        for headers, query, offered in attempts:
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(
                    matrix.server.ws_url + path + query,
                    additional_headers=headers,
                    subprotocols=["trainbus", offered],  # type: ignore[list-item]
                    proxy=None,
                ):
                    pass
            assert refusal.value.response.status_code == 401
            assert "Bearer" in _refusal(refusal.value.response.body or b"{}", matrix)
            refused += 1
        async with connect(
            matrix.server.ws_url + path, additional_headers=matrix.server.headers, proxy=None
        ):
            pass  # the control: the token in its place opens it
    else:
        for headers, query in cases:
            response = matrix.http(method, path + query, headers, json=body)
            if (method, template) in DOCS:  # static pages: the token is neither needed nor shown
                assert response.status_code in ((200, 422) if query else (200,)), response.text
                assert token not in response.text
                continue
            if (method, template) in PUBLIC:
                # public, so the token is not looked for; a query parameter it does not take
                # is refused, without echoing the value
                assert response.status_code == (422 if query else 200), response.text
                assert token not in response.text
                continue
            assert response.status_code == 401, (headers, query, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "Bearer" in _refusal(response.content, matrix)
            refused += 1
        control = matrix.http(method, path, matrix.server.headers, json={})
        assert control.status_code not in (400, 401, 403), control.text
    assert matrix.job_count() == jobs_before, "a refused request created a job"
    record(
        "7 auth matrix: credentials",
        route=f"{method} {template}",
        refused=refused,
        tried=len(cases),
    )


@pytest.mark.parametrize("origin", HOSTILE_ORIGINS)
async def test_hostile_origin_may_not_change_state_or_stream_even_with_the_token(
    matrix: Matrix, origin: str
) -> None:
    jobs_before = matrix.job_count()
    tried = 0
    spec = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1}
    for (method, template), kind in sorted(EXPECTED.items()):
        path = matrix.path(method, template)
        headers = {**matrix.server.headers, "Origin": origin}
        tried += 1
        if kind in ("stream", "worker"):
            with pytest.raises(InvalidStatus) as refusal:
                async with connect(
                    matrix.server.ws_url + path,
                    additional_headers=matrix.server.headers,
                    origin=origin,  # type: ignore[arg-type]
                    proxy=None,
                ):
                    pass
            assert refusal.value.response.status_code == 403
            assert "TRAINBUS_ALLOWED_ORIGINS" in _refusal(
                refusal.value.response.body or b"{}", matrix
            )
        elif kind == "change":
            response = matrix.http(method, path, headers, json=spec)
            assert response.status_code == 403, (method, path, response.text)
            assert "TRAINBUS_ALLOWED_ORIGINS" in _refusal(response.content, matrix)
        else:
            # reading is harmless without CORS: the browser gets no permission to show it
            response = matrix.http(method, path, headers)
            # the fixture's job runs the built-in trainer, which keeps no program log
            expected = 404 if template == "/jobs/{job_id}/log" else 200
            assert response.status_code == expected, (method, path, response.status_code)
            assert "access-control-allow-origin" not in response.headers
    assert matrix.job_count() == jobs_before
    assert (
        matrix.http("GET", f"/jobs/{matrix.job_id}", matrix.server.headers).json()["state"]
        == "completed"
    )
    record("7 auth matrix: origin", origin=origin, routes=tried)


def test_allowed_origin_may_change_state(matrix: Matrix) -> None:
    headers = {**matrix.server.headers, "Origin": "http://localhost:5173"}
    response = matrix.http("POST", f"/jobs/{matrix.job_id}/pause", headers)
    assert response.status_code == 409  # past the guard: a completed job cannot pause
    assert response.headers["access-control-allow-origin"] == "http://localhost:5173"


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_foreign_host_is_refused_on_every_route(matrix: Matrix, host: str) -> None:
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    tried = 0
    for method, template in sorted(EXPECTED):
        path = matrix.path(method, template)
        tried += 1
        if method == "WS":
            status, body = _raw_handshake(
                matrix, path, {"Host": host, "Authorization": f"Bearer {matrix.server.token}"}
            )
        else:
            response = matrix.http(method, path, {**matrix.server.headers, "Host": host}, json={})
            status, body = response.status_code, response.content
        assert status == 400, (method, path, status, body[:200])
        assert "TRAINBUS_ALLOWED_HOSTS" in _refusal(body, matrix)
    record("7 auth matrix: host", host=host, routes=tried)


def test_loopback_names_and_addresses_are_served(matrix: Matrix) -> None:
    port = matrix.server.url.rsplit(":", 1)[1]
    for host in (
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "127.0.0.1",
        f"[::1]:{port}",
        "app.localhost",
    ):
        response = matrix.http("GET", "/jobs", {**matrix.server.headers, "Host": host})
        assert response.status_code == 200, (host, response.text)
    status, _ = _raw_handshake(
        matrix, "/events/ws", {"Authorization": f"Bearer {matrix.server.token}"}
    )
    assert status == 101


def test_host_policy() -> None:
    policy = HostPolicy(["trainbus", "*.corp.example"], "0.0.0.0")
    for allowed in (
        "127.0.0.1:8000",
        "[::1]:8000",
        "10.1.2.3",
        "localhost",
        "a.localhost:1",
        "trainbus:8000",
        "TRAINBUS",
        "api.corp.example",
        None,
    ):
        assert policy.allows(allowed), allowed
    for refused in (
        "evil.example",
        "corp.example.evil",
        "trainbus.evil",
        "localhost.evil",
        "127.0.0.1.nip.io",
        "xcorp.example",
    ):
        assert not policy.allows(refused), refused
    assert HostPolicy(["*"], "127.0.0.1").allows("anything.example")
    assert HostPolicy([], "box.lan").allows("box.lan:8000")


def test_metrics_is_guarded_when_configured(tmp_path_factory: pytest.TempPathFactory) -> None:
    settings = make_settings(
        tmp_path_factory.mktemp("guarded"),
        metrics_require_token=True,
        resource_interval_seconds=60.0,
    )
    with run_server(create_app(settings), settings) as server:
        assert httpx.get(server.url + "/metrics").status_code == 401
        assert httpx.get(server.url + "/metrics", headers=server.headers).status_code == 200
        assert httpx.get(server.url + "/healthz").status_code == 200
