"""The hub's pieces: encoding once, per-client buffers, gaps and the slow-client limit."""

from __future__ import annotations

import json
import math

from trainbus.api._hub import ClientBuffer, encode_event
from trainbus.bus import Event, EventType


def _items(job: str, seqs: range) -> list[tuple[str, int, str]]:
    return [(job, s, f'{{"seq":{s}}}') for s in seqs]


def test_encoding_turns_non_finite_numbers_into_null() -> None:
    event = Event("j", 3, EventType.TRAIN_BATCH_END, 1.5, {"loss": math.nan, "m": [math.inf, 1]})
    decoded = json.loads(encode_event(event))
    assert decoded == {
        "job_id": "j",
        "seq": 3,
        "type": "train_batch_end",
        "time": 1.5,
        "data": {"loss": None, "m": [None, 1]},
    }


def test_overflow_drops_oldest_and_reports_the_range() -> None:
    client = ClientBuffer(job_id="j", types=None, buffer_size=3, max_lag=100)
    client._extend(_items("j", range(1, 3)))  # not taken yet: the next round overflows
    client._extend(_items("j", range(3, 6)))
    missed, items = client.take(10)
    assert missed == [("j", 1, 2, 2)]
    assert [seq for _, seq, _ in items] == [3, 4, 5]
    assert not client.too_slow


def test_a_client_that_took_everything_gets_a_whole_burst() -> None:
    # a trainer publishes 0.1 s of batch events at once; a prompt reader must get them live,
    # not from the event store, even when the burst is larger than its buffer
    client = ClientBuffer(job_id="j", types=None, buffer_size=3, max_lag=100)
    client._extend(_items("j", range(1, 9)))
    missed, items = client.take(100)
    assert missed == [] and [seq for _, seq, _ in items] == list(range(1, 9))
    client._extend(_items("j", range(9, 17)))  # taken everything again: a whole burst again
    assert len(client) == 8
    client._extend(_items("j", range(17, 19)))  # behind now: the bound applies
    missed, items = client.take(100)
    assert missed == [("j", 9, 15, 7)] and [seq for _, seq, _ in items] == [16, 17, 18]


def test_past_the_lag_limit_the_client_is_too_slow_and_listeners_hear_it() -> None:
    heard: list[bool] = []
    client = ClientBuffer(
        job_id="j", types=None, buffer_size=2, max_lag=5, on_too_slow=[lambda: heard.append(True)]
    )
    client._extend(_items("j", range(1, 3)))
    client._extend(_items("j", range(3, 10)))
    assert client.too_slow and heard == [True]
    assert len(client) == 0  # nothing more is kept for it


def test_drops_while_replaying_do_not_count_as_lag() -> None:
    client = ClientBuffer(job_id="j", types=None, buffer_size=2, max_lag=5)
    client.replaying = True
    client._extend(_items("j", range(1, 3)))
    client._extend(_items("j", range(3, 50)))
    assert not client.too_slow
    missed, _ = client.take(10)
    assert missed == [("j", 1, 47, 47)]


def test_ending_a_client_records_the_close_and_runs_its_end_callbacks() -> None:
    heard: list[str] = []
    client = ClientBuffer(job_id="j", types=None, buffer_size=10, max_lag=100)
    client.on_end.append(lambda: heard.append("ended"))
    client._extend(_items("j", range(1, 4)))
    client.end(4404, "job deleted")
    assert client.ended == (4404, "job deleted")
    assert client.closed and len(client) == 0 and heard == ["ended"]
    assert not client.too_slow
    client.end(4404, "job deleted")  # a second end changes nothing
    assert heard == ["ended"]


def test_a_range_the_hub_missed_takes_in_the_events_still_buffered_before_it() -> None:
    # the stream refills a missed range before the buffered events: an older buffered event
    # left behind a newer missed range would count as sent once the range is refilled
    client = ClientBuffer(job_id="j", types=None, buffer_size=100, max_lag=100)
    client._extend(_items("j", range(1, 6)))
    client._gap("j", 6, 9, 4)
    client._extend(_items("j", range(10, 12)))
    missed, items = client.take(100)
    assert missed == [("j", 1, 9, 9)]
    assert [seq for _, seq, _ in items] == [10, 11]
    assert not client.too_slow  # moving buffered events into the range is not lag
