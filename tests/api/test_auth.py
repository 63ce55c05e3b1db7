"""Token and Origin details; the full exposure matrix over every route is in
tests/reliability/test_auth_matrix.py."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect

from api import Settings
from api._auth import OriginPolicy, ensure_token

from .server import LiveServer


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
