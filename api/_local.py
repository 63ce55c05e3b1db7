"""How the CLI finds a local server: the server leaves the URL it listens on (``server.json``)
beside its token (``token``) in its data folder, and the CLI reads both from there."""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "ServerLocation",
    "find_server",
    "read_server_url",
    "read_token_file",
    "server_file",
    "token_file",
    "write_server_url",
]

SERVER_FILE = "server.json"


def token_file(data_dir: Path) -> Path:
    """Where a server that generated its token leaves it for local CLI use (mode 0600)."""
    return data_dir / "token"


def read_token_file(data_dir: Path) -> str | None:
    """The token a local server generated, if its data folder holds one."""
    try:
        return token_file(data_dir).read_text().strip() or None
    except OSError:
        return None


def server_file(data_dir: Path) -> Path:
    """Where a running server records the URL it listens on."""
    return data_dir / SERVER_FILE


def bound_url(sock: socket.socket) -> str:
    """The loopback-reachable ``http://`` URL of a bound listening socket."""
    host, port = sock.getsockname()[:2]
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def write_server_url(data_dir: Path, url: str) -> Path:
    """Record ``url`` in the data folder (replacing an older one; never through a link)."""
    path = server_file(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{SERVER_FILE}.{os.getpid()}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w") as file:
        json.dump({"url": url, "pid": os.getpid()}, file)
    os.replace(temp, path)  # a link at ``path`` is replaced, not followed
    return path


def read_server_url(data_dir: Path) -> str | None:
    """The URL a server in ``data_dir`` recorded, if any."""
    try:
        url = json.loads(server_file(data_dir).read_text()).get("url")
    except (OSError, ValueError, AttributeError):
        return None
    return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None


@dataclass
class ServerLocation:
    """Where the CLI will send requests, and where each part came from (for error messages)."""

    url: str
    url_source: str
    token: str | None
    token_source: str
    looked_in: list[Path] = field(default_factory=list)

    def explain(self) -> str:
        """One sentence naming the URL's and the token's sources, for a 401 or a refused
        connection."""
        folders = ", ".join(str(token_file(folder)) for folder in self.looked_in)
        token = (
            f"the token came from {self.token_source}"
            if self.token is not None
            else f"no token found (looked for {folders or 'no token file'})"
        )
        return (
            f"server {self.url} (from {self.url_source}); {token}. Pass --data-dir with the "
            "server's data folder, or --url and --token"
        )


def find_server(
    *,
    url: str | None,
    token: str | None,
    token_from_env: str | None,
    data_dirs: list[Path],
    default_url: str,
) -> ServerLocation:
    """Pick the URL and token: the explicit ones first, then the first data folder in
    ``data_dirs`` that holds a server file or a token, then ``default_url``."""
    chosen = next(
        (
            folder
            for folder in data_dirs
            if read_server_url(folder) is not None or read_token_file(folder) is not None
        ),
        None,
    )
    if url is not None:
        where, url_source = url, "--url"
    elif chosen is not None and (recorded := read_server_url(chosen)) is not None:
        where, url_source = recorded, str(server_file(chosen))
    else:
        where, url_source = default_url, "the TRAINBUS_HOST/TRAINBUS_PORT settings"
    if token is not None:
        found, token_source = token, "--token"
    elif token_from_env is not None:
        found, token_source = token_from_env, "TRAINBUS_TOKEN"
    elif chosen is not None and (stored := read_token_file(chosen)) is not None:
        found, token_source = stored, str(token_file(chosen))
    else:
        found, token_source = None, ""
    return ServerLocation(where, url_source, found, token_source, list(data_dirs))
