"""Python clients for the trainbus API, for scripts, notebooks and the CLI.

::

    from trainbus.api import TrainbusClient

    with TrainbusClient("http://127.0.0.1:8000", token="...") as client:
        job = client.submit({"model": {"name": "mlp"}, "dataset": {"name": "digits"}})
        for event in client.stream(job["id"]):
            print(event["seq"], event["type"])

:class:`AsyncTrainbusClient` offers the same methods as coroutines (``async for`` for
:meth:`~AsyncTrainbusClient.stream`). Streams reconnect by themselves and resume after the
last ``seq`` they yielded, so a consumer sees each event once, in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode, urlsplit, urlunsplit

import anyio
import httpx
from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import connect as sync_connect

from trainbus.bus import ENDED_STATES
from trainbus.bus import TERMINAL_JOB_EVENT_TYPES as RUN_END_EVENTS

__all__ = [
    "AsyncTrainbusClient",
    "ClientError",
    "HTTPStatusError",
    "StreamClosed",
    "TrainbusClient",
]

_NO_RETRY_CLOSE_CODES = frozenset({1008})


class ClientError(Exception):
    """Base of what the clients raise about the server's answers::

        ClientError
        ├── HTTPStatusError   the server answered an error status (``status``, ``detail``)
        └── StreamClosed      a WebSocket stream was refused or cannot be resumed
                              (``status``: the close code or handshake status, ``detail``)

    Network failures stay httpx's and websockets' own exceptions.
    """

    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"{status}: {detail}")


class HTTPStatusError(ClientError):
    """Raised when the server answers with an error status; ``detail`` says what to fix."""


class StreamClosed(ClientError):
    """Raised when the server refuses a WebSocket stream or it cannot be resumed."""


def _raise_for(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        detail: Any = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    raise HTTPStatusError(response.status_code, detail)


def _ws_url(base_url: str, path: str, query: Mapping[str, Any]) -> str:
    parts = urlsplit(base_url)
    scheme = "wss" if parts.scheme == "https" else "ws"
    params = {k: v for k, v in query.items() if v is not None}
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, urlencode(params), ""))


def _decode(message: str | bytes) -> list[dict[str, Any]]:
    payload = json.loads(message)
    return payload if isinstance(payload, list) else [payload]


def _close_of(error: ConnectionClosed) -> tuple[int, str]:
    frame = error.rcvd or error.sent
    return (1006, "connection lost") if frame is None else (frame.code, frame.reason)


def _types(types: Iterable[str] | str | None) -> str | None:
    if types is None:
        return None
    return types if isinstance(types, str) else ",".join(types)


class _Common:
    def __init__(self, base_url: str, token: str | None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token

    @property
    def _headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {self.token}"}

    def _stream_url(self, job_id: str | None, after_seq: int, types: str | None) -> str:
        if job_id is None:
            return _ws_url(self.base_url, "/events/ws", {"types": types})
        return _ws_url(
            self.base_url, f"/jobs/{job_id}/events/ws", {"after_seq": after_seq, "types": types}
        )


class TrainbusClient(_Common):
    """A blocking client (``httpx`` and ``websockets``' sync client).

    :param base_url: the server, e.g. ``http://127.0.0.1:8000``.
    :param token: the API token.
    :param timeout: seconds for each HTTP request.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(base_url, token)
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=timeout)

    def __enter__(self) -> TrainbusClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    def health(self) -> dict[str, Any]:
        return dict(self._request("GET", "/healthz").json())

    def ready(self) -> dict[str, Any]:
        return dict(self._request("GET", "/readyz").json())

    def registry(self) -> dict[str, Any]:
        """The models and datasets a spec may name."""
        return dict(self._request("GET", "/registry").json())

    def metrics(self) -> str:
        return self._request("GET", "/metrics").text

    def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        """Submit a job spec; returns the job record (with ``id``)."""
        return dict(self._request("POST", "/jobs", json=dict(spec)).json())

    def jobs(self, state: str | None = None, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
        """One page of jobs: ``{"items", "total", "offset", "limit"}``."""
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state is not None:
            params["state"] = state
        return dict(self._request("GET", "/jobs", params=params).json())

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("GET", f"/jobs/{job_id}").json())

    def pause(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/jobs/{job_id}/pause").json())

    def resume(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/jobs/{job_id}/resume").json())

    def stop(self, job_id: str) -> dict[str, Any]:
        return dict(self._request("POST", f"/jobs/{job_id}/stop").json())

    def save(self, job_id: str) -> dict[str, Any]:
        """Ask for a checkpoint at the next batch boundary (``model_save`` acknowledges it)."""
        return dict(self._request("POST", f"/jobs/{job_id}/save").json())

    def set_lr(self, job_id: str, value: float) -> dict[str, Any]:
        """Set the learning rate at the next batch boundary (``lr_changed`` acknowledges it)."""
        return dict(self._request("POST", f"/jobs/{job_id}/set_lr", json={"value": value}).json())

    def delete(self, job_id: str) -> None:
        self._request("DELETE", f"/jobs/{job_id}")

    def events(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        types: Iterable[str] | str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Stored events of a job, in ``seq`` order."""
        params: dict[str, Any] = {"after_seq": after_seq, "limit": limit}
        if types is not None:
            params["types"] = _types(types)
        return list(self._request("GET", f"/jobs/{job_id}/events", params=params).json())

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return list(self._request("GET", f"/jobs/{job_id}/checkpoints").json())

    def download_checkpoint(self, job_id: str, name: str, path: str | Path) -> Path:
        """Save checkpoint ``name`` (from :meth:`checkpoints`) to ``path``."""
        target = Path(path)
        with self._http.stream("GET", f"/jobs/{job_id}/checkpoints/{name}") as response:
            if not response.is_success:
                response.read()
                _raise_for(response)
            with target.open("wb") as file:
                for chunk in response.iter_bytes():
                    file.write(chunk)
        return target

    def wait(
        self,
        job_id: str,
        states: Iterable[str] = ENDED_STATES,
        *,
        timeout: float = 300.0,
        interval: float = 0.2,
    ) -> dict[str, Any]:
        """Poll until the job reaches one of ``states``; returns its record.

        :raises TimeoutError: if it does not within ``timeout`` seconds.
        """
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        while True:
            record = self.job(job_id)
            if record["state"] in wanted:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} is {record['state']}, not in {sorted(wanted)}")
            time.sleep(interval)

    def stream(
        self,
        job_id: str | None = None,
        *,
        after_seq: int = 0,
        types: Iterable[str] | str | None = None,
        reconnect: bool = True,
        until_end: bool = True,
        retry_delay: float = 0.5,
        max_retries: int = 20,
    ) -> Iterator[dict[str, Any]]:
        """Yield events as they happen: a job's (replayed after ``after_seq``) or every job's.

        Reconnects after a dropped connection and resumes after the last ``seq`` it
        yielded. With ``until_end`` a job's stream ends after its ``job_completed``,
        ``job_stopped`` or ``job_failed`` event.
        """
        last = after_seq
        retries = 0
        types_param = _types(types)
        while True:
            url = self._stream_url(job_id, last, types_param)
            try:
                with sync_connect(
                    url,
                    additional_headers=self._headers,
                    compression=None,
                    max_size=None,
                    open_timeout=10,
                    proxy=None,
                ) as socket:
                    retries = 0
                    for message in socket:
                        for event in _decode(message):
                            if job_id is not None and event["type"] != "gap":
                                if event["seq"] <= last:
                                    continue
                                last = event["seq"]
                            yield event
                            if until_end and job_id is not None and event["type"] in RUN_END_EVENTS:
                                return
            except InvalidStatus as error:
                status = error.response.status_code
                raise StreamClosed(status, error.response.body.decode(errors="replace")) from None
            except ConnectionClosed as error:
                code, reason = _close_of(error)
                if code in _NO_RETRY_CLOSE_CODES or not reconnect:
                    raise StreamClosed(code, reason) from None
            except (OSError, InvalidHandshake, TimeoutError):
                if not reconnect:
                    raise
            else:
                if not reconnect:
                    return
            retries += 1
            if retries > max_retries:
                raise StreamClosed(0, f"gave up after {max_retries} reconnection attempts")
            time.sleep(retry_delay)


class AsyncTrainbusClient(_Common):
    """The asynchronous twin of :class:`TrainbusClient` (``httpx.AsyncClient``, ``websockets``)."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        token: str | None = None,
        *,
        timeout: float = 30.0,
    ) -> None:
        super().__init__(base_url, token)
        self._http = httpx.AsyncClient(
            base_url=self.base_url, headers=self._headers, timeout=timeout
        )

    async def __aenter__(self) -> AsyncTrainbusClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = await self._http.request(method, path, **kwargs)
        _raise_for(response)
        return response

    async def health(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/healthz")).json())

    async def ready(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/readyz")).json())

    async def registry(self) -> dict[str, Any]:
        return dict((await self._request("GET", "/registry")).json())

    async def metrics(self) -> str:
        return (await self._request("GET", "/metrics")).text

    async def submit(self, spec: Mapping[str, Any]) -> dict[str, Any]:
        return dict((await self._request("POST", "/jobs", json=dict(spec))).json())

    async def jobs(
        self, state: str | None = None, *, offset: int = 0, limit: int = 50
    ) -> dict[str, Any]:
        params: dict[str, Any] = {"offset": offset, "limit": limit}
        if state is not None:
            params["state"] = state
        return dict((await self._request("GET", "/jobs", params=params)).json())

    async def job(self, job_id: str) -> dict[str, Any]:
        return dict((await self._request("GET", f"/jobs/{job_id}")).json())

    async def pause(self, job_id: str) -> dict[str, Any]:
        return dict((await self._request("POST", f"/jobs/{job_id}/pause")).json())

    async def resume(self, job_id: str) -> dict[str, Any]:
        return dict((await self._request("POST", f"/jobs/{job_id}/resume")).json())

    async def stop(self, job_id: str) -> dict[str, Any]:
        return dict((await self._request("POST", f"/jobs/{job_id}/stop")).json())

    async def save(self, job_id: str) -> dict[str, Any]:
        return dict((await self._request("POST", f"/jobs/{job_id}/save")).json())

    async def set_lr(self, job_id: str, value: float) -> dict[str, Any]:
        response = await self._request("POST", f"/jobs/{job_id}/set_lr", json={"value": value})
        return dict(response.json())

    async def delete(self, job_id: str) -> None:
        await self._request("DELETE", f"/jobs/{job_id}")

    async def events(
        self,
        job_id: str,
        *,
        after_seq: int = 0,
        types: Iterable[str] | str | None = None,
        limit: int = 1000,
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"after_seq": after_seq, "limit": limit}
        if types is not None:
            params["types"] = _types(types)
        return list((await self._request("GET", f"/jobs/{job_id}/events", params=params)).json())

    async def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        return list((await self._request("GET", f"/jobs/{job_id}/checkpoints")).json())

    async def wait(
        self,
        job_id: str,
        states: Iterable[str] = ENDED_STATES,
        *,
        timeout: float = 300.0,
        interval: float = 0.2,
    ) -> dict[str, Any]:
        """Poll until the job reaches one of ``states``; returns its record.

        :raises TimeoutError: if it does not within ``timeout`` seconds.
        """
        wanted = frozenset(states)
        with anyio.fail_after(timeout):
            while True:
                record = await self.job(job_id)
                if record["state"] in wanted:
                    return record
                await anyio.sleep(interval)

    async def stream(
        self,
        job_id: str | None = None,
        *,
        after_seq: int = 0,
        types: Iterable[str] | str | None = None,
        reconnect: bool = True,
        until_end: bool = True,
        retry_delay: float = 0.5,
        max_retries: int = 20,
    ) -> AsyncIterator[dict[str, Any]]:
        """Async twin of :meth:`TrainbusClient.stream`."""
        last = after_seq
        retries = 0
        types_param = _types(types)
        while True:
            url = self._stream_url(job_id, last, types_param)
            try:
                async with async_connect(
                    url,
                    additional_headers=self._headers,
                    compression=None,
                    max_size=None,
                    open_timeout=10,
                    proxy=None,
                ) as socket:
                    retries = 0
                    async for message in socket:
                        for event in _decode(message):
                            if job_id is not None and event["type"] != "gap":
                                if event["seq"] <= last:
                                    continue
                                last = event["seq"]
                            yield event
                            if until_end and job_id is not None and event["type"] in RUN_END_EVENTS:
                                return
            except InvalidStatus as error:
                status = error.response.status_code
                raise StreamClosed(status, error.response.body.decode(errors="replace")) from None
            except ConnectionClosed as error:
                code, reason = _close_of(error)
                if code in _NO_RETRY_CLOSE_CODES or not reconnect:
                    raise StreamClosed(code, reason) from None
            except (OSError, InvalidHandshake, TimeoutError):
                if not reconnect:
                    raise
            else:
                if not reconnect:
                    return
            retries += 1
            if retries > max_retries:
                raise StreamClosed(0, f"gave up after {max_retries} reconnection attempts")
            await anyio.sleep(retry_delay)
