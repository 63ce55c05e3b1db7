"""Exactly-once streaming: clients that drop and resume with ``after_seq`` miss nothing.

Many WebSocket clients follow real training jobs (several at once) and disconnect at random
moments, cleanly or by dropping the TCP connection; each reconnects with the last ``seq`` it
saw. Every client must see every event of its job exactly once, in order, from seq 1 through
the terminal event, the same events the store holds.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import create_app

from .conftest import record, sized

pytestmark = pytest.mark.slow

TERMINAL = {"job_completed", "job_stopped", "job_failed"}
JOBS = 3
CLIENTS = sized(20, 200)
EPOCHS = sized(3, 12)
SEED = 20261130


@dataclass
class Follower:
    """One client's view of its job, across all its connections."""

    job_id: str
    rng: random.Random
    events: list[dict[str, Any]] = field(default_factory=list)
    connections: int = 0
    aborted: int = 0

    @property
    def last_seq(self) -> int:
        return int(self.events[-1]["seq"]) if self.events else 0

    @property
    def done(self) -> bool:
        return bool(self.events) and self.events[-1]["type"] in TERMINAL


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("data"), max_running_jobs=JOBS)
    with run_server(create_app(settings), settings) as live:
        yield live


def _spec(seed: int) -> dict[str, Any]:
    return {
        "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
        "dataset": {"name": "digits"},
        "epochs": EPOCHS,
        "batch_size": 16,
        "seed": seed,
    }


async def _messages(socket: ClientConnection, count: int) -> list[dict[str, Any]]:
    """Up to ``count`` messages' events; fewer once the terminal event arrives."""
    events: list[dict[str, Any]] = []
    for _ in range(count):
        with anyio.fail_after(60):
            payload = json.loads(await socket.recv())
        events.extend(payload if isinstance(payload, list) else [payload])
        if events[-1]["type"] in TERMINAL:
            break
    return events


async def _follow(server: LiveServer, follower: Follower) -> None:
    """Connect, read a few messages, drop the connection (cleanly or not); until the end."""
    while not follower.done:
        url = f"{server.ws_url}/jobs/{follower.job_id}/events/ws?after_seq={follower.last_seq}"
        follower.connections += 1
        with contextlib.suppress(ConnectionClosed):
            async with connect(
                url, additional_headers=server.headers, compression=None, proxy=None
            ) as socket:
                follower.events.extend(await _messages(socket, follower.rng.randint(1, 6)))
                if follower.rng.random() < 0.3:  # vanish without a closing handshake
                    follower.aborted += 1
                    socket.transport.abort()


def _check(follower: Follower, stored: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in follower.events]
    assert seqs == list(range(1, len(seqs) + 1)), f"{follower.job_id}: not 1..n exactly once"
    assert follower.events[-1]["type"] in TERMINAL
    end = len(seqs)
    whole = ("seq", "type", "time", "data")  # whole events, payloads and times included
    assert [tuple(e[k] for k in whole) for e in follower.events] == [
        tuple(e[k] for k in whole) for e in stored[:end]
    ], "the streamed events differ from the stored ones"


async def test_reconnecting_clients_see_every_event_once_in_order(server: LiveServer) -> None:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        job_ids = []
        for index in range(JOBS):
            response = await http.post("/jobs", json=_spec(index))
            assert response.status_code == 201, response.text
            job_ids.append(response.json()["id"])
        followers = [Follower(job_ids[i % JOBS], random.Random(SEED + i)) for i in range(CLIENTS)]
        with anyio.fail_after(100):
            async with anyio.create_task_group() as group:
                for follower in followers:
                    group.start_soon(_follow, server, follower)
        stored: dict[str, list[dict[str, Any]]] = {}
        for job_id in job_ids:
            response = await http.get(f"/jobs/{job_id}/events", params={"limit": 10_000})
            assert response.status_code == 200
            stored[job_id] = response.json()
    elapsed = time.monotonic() - started
    for follower in followers:
        _check(follower, stored[follower.job_id])
    record(
        "stream_exactly_once",
        jobs=JOBS,
        clients=CLIENTS,
        epochs=EPOCHS,
        events_per_job={job_id: len(events) for job_id, events in stored.items()},
        connections=sum(f.connections for f in followers),
        aborted_connections=sum(f.aborted for f in followers),
        events_received=sum(len(f.events) for f in followers),
        duplicates=0,
        gaps=0,
        out_of_order=0,
        wall_s=round(elapsed, 2),
    )
