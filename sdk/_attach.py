"""Creating a run's job on the server, or attaching to it again: ``PUT /runs/{run_id}``.

The request is retried while no server answers (connection refused, a server starting up or
shutting down: 503) until ``timeout``; a refusal (401, 409, 422) is final and its message is
the server's.
"""

from __future__ import annotations

import functools
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._errors import RunRefused, ServerUnreachable

__all__ = ["Attachment", "ServerAddress", "attach_run"]

DEFAULT_URL = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class ServerAddress:
    """Where the server is and the API token to reach it (never printed)."""

    url: str
    token: str = field(repr=False)

    @classmethod
    def resolve(cls, url: str | None, token: str | None) -> ServerAddress:
        """From the arguments, else ``TRAINBUS_URL`` and ``TRAINBUS_TOKEN``.

        :raises RunRefused: without a token.
        """
        url = (url or os.environ.get("TRAINBUS_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("TRAINBUS_TOKEN")
        if not url.startswith(("http://", "https://")):
            raise RunRefused(f"the server URL must start with http:// or https://, got {url!r}")
        if not token:
            raise RunRefused(
                "no API token: pass token=... or set TRAINBUS_TOKEN (the server prints its "
                "token when it starts, and keeps it in <data dir>/token)"
            )
        return cls(url, token)

    def worker_url(self, job_id: str) -> str:
        """The job's worker endpoint, where the run's events go and its commands come from."""
        scheme, rest = self.url.split("://", 1)
        return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/jobs/{job_id}/worker"


@dataclass(frozen=True)
class Attachment:
    """The run's job and this process's credential for its worker endpoint."""

    job_id: str
    worker_token: str = field(repr=False)
    created: bool
    record: dict[str, Any]


def attach_run(
    server: ServerAddress, run_id: str, request: dict[str, Any], *, timeout: float
) -> Attachment:
    """``PUT /runs/{run_id}``, retried while the server cannot be reached.

    :raises ServerUnreachable: if no server answered within ``timeout`` seconds.
    :raises RunRefused: if the server refused the run.
    """
    deadline = time.monotonic() + timeout
    pause = 0.1
    last_problem = "no answer"
    headers = {"Authorization": f"Bearer {server.token}"}
    with httpx.Client(timeout=10.0, trust_env=False, verify=_tls_context()) as client:
        while True:
            try:
                response = client.put(f"{server.url}/runs/{run_id}", json=request, headers=headers)
            except httpx.TransportError as error:
                last_problem = type(error).__name__
            else:
                if response.status_code in (200, 201):
                    body = response.json()
                    return Attachment(
                        job_id=body["job"]["id"],
                        worker_token=body["worker_token"],
                        created=bool(body["created"]),
                        record=body["job"],
                    )
                if response.status_code != 503:
                    raise RunRefused(
                        f"the server refused run {run_id!r} "
                        f"({response.status_code}): {_detail(response)}"
                    )
                last_problem = _detail(response)
            if time.monotonic() + pause > deadline:
                raise ServerUnreachable(
                    f"no trainbus server took run {run_id!r} at {server.url} within "
                    f"{timeout:.0f} s ({last_problem}): start one with `trainbus serve`, or "
                    "point TRAINBUS_URL at it"
                )
            time.sleep(pause)
            pause = min(2.0, pause * 2)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default verifying context, made once a process: a client that makes its own
    reads the CA bundle again (14 ms on each attach, a run's start and each reattach)."""
    return httpx.create_ssl_context()


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        return response.text[:200]
    if isinstance(detail, list):  # a validation error: name the fields
        return "; ".join(
            f"{'.'.join(str(p) for p in item.get('loc', ())[1:])}: {item.get('msg')}"
            for item in detail[:5]
        )
    return str(detail)
