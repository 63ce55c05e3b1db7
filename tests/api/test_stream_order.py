"""A job's stream sends every seq once and in order, whatever reached its buffer and how."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from trainbus.api._hub import ClientBuffer, encode_event
from trainbus.api._websocket import _Stream
from trainbus.bus import Event, EventType

pytestmark = pytest.mark.anyio


def _event(seq: int) -> Event:
    return Event("j", seq, EventType.TRAIN_BATCH_END, 1.0, {"batch": seq})


def _items(seqs: range) -> list[tuple[str, int, str]]:
    return [("j", s, encode_event(_event(s))) for s in seqs]


class _Store:
    """Every event up to ``last``, as the event store holds them."""

    def __init__(self, last: int) -> None:
        self.last = last

    async def wait_for(self, job_id: str, seq: int) -> bool:
        return seq <= self.last

    async def read(
        self, job_id: str, *, after_seq: int = 0, types: Any = None, limit: int | None = None
    ) -> list[Event]:
        seqs = range(after_seq + 1, self.last + 1)
        return [_event(s) for s in seqs][:limit]


class _Socket:
    def __init__(self, client: ClientBuffer, last: int) -> None:
        self.seqs: list[int] = []
        self.client = client
        self.last = last

    async def send_text(self, text: str) -> None:
        payload = json.loads(text)
        self.seqs += [e["seq"] for e in (payload if isinstance(payload, list) else [payload])]
        if self.seqs[-1] >= self.last:
            self.client.close()  # the stream's live loop ends


async def _stream_of(client: ClientBuffer, last_stored: int) -> list[int]:
    settings = SimpleNamespace(ws_max_message_events=1000, ws_max_message_bytes=1 << 20)
    services = SimpleNamespace(settings=settings, history=_Store(last_stored))
    socket = _Socket(client, last_stored)
    stream = _Stream(socket, services, client, "j", None, 0)  # type: ignore[arg-type]
    with anyio.fail_after(5):
        await stream.live()
    return socket.seqs


async def test_a_range_the_hub_missed_behind_buffered_events_loses_none_of_them() -> None:
    client = ClientBuffer(job_id="j", types=None, buffer_size=100, max_lag=1000)
    client._extend(_items(range(1, 6)))
    client._gap("j", 6, 9, 4)  # the hub missed 6..9 while 1..5 were still buffered
    client._extend(_items(range(10, 13)))
    assert await _stream_of(client, 12) == list(range(1, 13))


async def test_a_hole_no_drop_accounts_for_is_sent_from_the_store() -> None:
    client = ClientBuffer(job_id="j", types=None, buffer_size=100, max_lag=1000)
    client._extend(_items(range(1, 4)))
    client._extend(_items(range(8, 11)))  # 4..7 never reached the buffer
    assert await _stream_of(client, 10) == list(range(1, 11))
