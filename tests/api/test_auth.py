"""Token and Origin details; the full exposure matrix over every route is in
tests/reliability/test_auth_matrix.py."""

from __future__ import annotations

import gc
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from pydantic import SecretStr
from websockets.asyncio.client import connect

from trainbus.api import Settings, create_app, uvicorn_config
from trainbus.api._auth import OriginPolicy, TokenFileRefused, ensure_token, write_token_file
from trainbus.api._server import bind_then_write_token

from ..conftest import free_port
from .server import LiveServer, make_settings, run_server


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


def test_a_token_symlink_is_refused_and_its_target_left_alone(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (data_dir / "token").symlink_to(victim)
    with pytest.raises(TokenFileRefused, match="symbolic link"):
        write_token_file(data_dir, SecretStr("new-token-0123456789"))
    assert victim.read_text() == "precious\n"
    assert (data_dir / "token").is_symlink()


def test_a_data_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    with pytest.raises(TokenFileRefused, match="chmod go-w"):
        write_token_file(data_dir, SecretStr("new-token-0123456789"))
    assert not (data_dir / "token").exists()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_a_data_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    data_dir = tmp_path / "theirs"
    data_dir.mkdir(mode=0o755)
    os.chown(data_dir, 65534, 65534)
    with pytest.raises(TokenFileRefused, match="another user"):
        write_token_file(data_dir, SecretStr("new-token-0123456789"))


def test_a_token_file_of_looser_mode_is_replaced_by_a_0600_one(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    old = data_dir / "token"
    old.write_text("old-token\n")
    old.chmod(0o644)
    path = write_token_file(data_dir, SecretStr("new-token-0123456789"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == "new-token-0123456789\n"
    assert [p.name for p in data_dir.iterdir()] == ["token"]  # no temporary file left


def test_only_a_token_file_this_user_alone_controls_is_used_again(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    write_token_file(data_dir, SecretStr("kept-token-0123456789"))
    kept, generated = ensure_token(Settings(data_dir=data_dir, token=None))
    assert not generated and kept.token == SecretStr("kept-token-0123456789")
    (data_dir / "token").chmod(0o644)  # others could have read (or planted) it
    fresh, generated = ensure_token(Settings(data_dir=data_dir, token=None))
    assert generated and fresh.token != SecretStr("kept-token-0123456789")


def test_a_second_server_on_a_busy_port_keeps_the_running_ones_token(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    first = make_settings(data_dir)
    write_token_file(data_dir, SecretStr("running-server-token"))
    with run_server(create_app(first), first):
        # a token of its own, as a server with a fresh data folder would generate
        second = first.model_copy(update={"token": SecretStr("second-server-token")})
        config = uvicorn_config(create_app(second), second)
        with warnings.catch_warnings():
            # uvicorn leaves the socket it failed to bind to the garbage collector
            warnings.simplefilter("ignore", ResourceWarning)
            with pytest.raises(SystemExit):
                bind_then_write_token(config, second, generated=True)
            gc.collect()
    assert (data_dir / "token").read_text() == "running-server-token\n"


def test_serve_into_a_folder_others_can_write_says_so_without_a_traceback(tmp_path: Path) -> None:
    data_dir = tmp_path / "shared"
    data_dir.mkdir()
    data_dir.chmod(0o777)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    port = str(free_port())
    folder = str(data_dir)
    done = subprocess.run(
        [sys.executable, "-m", "trainbus.api.cli", "serve", "--port", port, "--data-dir", folder],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "chmod go-w" in output and "Traceback" not in output, output
    assert not (data_dir / "token").exists()
