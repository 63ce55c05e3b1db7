"""The event store: exactly what was written, in order; filters; retention; restart."""

from __future__ import annotations

import json
import math
import sqlite3
from contextlib import closing
from pathlib import Path

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainbus.bus import Event, EventBus, EventType
from trainbus.subscribers import EventStore
from trainbus.subscribers._store import RESERVE_AHEAD

KINDS = [EventType.TRAIN_BATCH_END, EventType.FIT_EPOCH_END, EventType.MODEL_SAVE]


def _event(job_id: str, seq: int, kind: EventType = EventType.TRAIN_BATCH_END) -> Event:
    return Event(job_id, seq, kind, 1000.0 + seq, {"step": seq, "loss": 1.0 / seq, "m": [1, "x"]})


async def test_store_returns_exactly_what_the_bus_delivered(data_dir: Path) -> None:
    store = EventStore(data_dir / "trainbus.db")
    published: list[Event] = []
    async with EventBus() as bus:
        handle = bus.attach(store)

        def publish() -> None:
            for i in range(3000):
                job = f"job-{i % 3}"
                kind = KINDS[i % len(KINDS)]
                published.append(bus.publish(job, kind, {"i": i, "nested": {"v": [i, 0.5]}}))

        await anyio.to_thread.run_sync(publish)
        for last in published[-3:]:
            assert await anyio.to_thread.run_sync(bus.wait_processed, last, 10.0)
        await store.flush()
        for job in ("job-0", "job-1", "job-2"):
            expected = [e for e in published if e.job_id == job]
            assert store.last_seq(job) == expected[-1].seq
            assert store.read(job) == expected
        await handle.detach()
    store.close()


def test_filters_and_limits(data_dir: Path) -> None:
    with EventStore(data_dir / "trainbus.db") as store:
        events = [_event("a", seq, KINDS[seq % 3]) for seq in range(1, 31)]
        store.write(events)
        assert store.read("a", after_seq=25) == events[25:]
        assert store.read("a", limit=4) == events[:4]
        assert store.read("a", types=["on_fit_epoch_end"]) == [
            e for e in events if e.type is EventType.FIT_EPOCH_END
        ]
        assert store.read("a", types=[EventType.MODEL_SAVE], after_seq=10, limit=2) == [
            events[10],
            events[13],
        ]
        assert store.read("a", types=[]) == []
        assert store.read("nobody") == [] and store.last_seq("nobody") == 0
        assert store.job_ids() == ["a"]
        assert store.delete_job("a") == 30
        assert store.read("a") == [] and store.last_seq("a") == 0


def test_gaps_are_not_stored(data_dir: Path) -> None:
    with EventStore(data_dir / "trainbus.db") as store:
        gap = Event("a", 5, EventType.GAP, 1.0, {"from_seq": 1, "to_seq": 5})
        assert store.write([gap, _event("a", 6)]) == 1
        assert [e.seq for e in store.read("a")] == [6]


def test_survives_restart_next_to_another_table(data_dir: Path) -> None:
    path = data_dir / "trainbus.db"
    jobs = sqlite3.connect(path, isolation_level=None)  # the job manager's connection
    jobs.execute("PRAGMA journal_mode = WAL")
    jobs.execute("CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT)")
    events = [_event("a", seq) for seq in range(1, 101)]
    with EventStore(path) as store:
        store.write(events[:50])
        jobs.execute("INSERT INTO jobs VALUES ('a', 'running')")
        store.write(events[50:])
    with EventStore(path) as reopened:
        assert reopened.read("a") == events
        assert reopened.last_seq("a") == 100
    assert jobs.execute("SELECT state FROM jobs").fetchone() == ("running",)
    jobs.close()


def test_keep_every_nth_batch_event(data_dir: Path) -> None:
    with EventStore(
        data_dir / "trainbus.db", keep_batch_events="every_n", batch_event_every=4
    ) as store:
        events = [_event("a", seq) for seq in range(1, 11)]
        events.append(_event("a", 11, EventType.FIT_EPOCH_END))
        events.append(_event("a", 12))
        store.write(events)
        assert [e.seq for e in store.read("a")] == [1, 5, 9, 11]
        assert store.last_seq("a") == 12  # skipped events count as handled


def test_drop_batch_events_after_the_end(data_dir: Path) -> None:
    with EventStore(data_dir / "trainbus.db", keep_batch_events="none_after_end") as store:
        store.write([_event("a", 1), _event("a", 2, EventType.FIT_EPOCH_END), _event("a", 3)])
        store.write([_event("b", 1)])
        assert len(store.read("a")) == 3
        store.write([_event("a", 4, EventType.JOB_COMPLETED)])
        assert [e.seq for e in store.read("a")] == [2, 4]
        assert len(store.read("b")) == 1


@settings(max_examples=30, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b"]),
            st.sampled_from(KINDS),
            st.dictionaries(
                st.text(max_size=5),
                st.one_of(
                    st.integers(-(2**70), 2**70),  # past 64 bits orjson refuses: rows then
                    st.floats(allow_nan=False),  # infinities: orjson writes null, rows then
                    st.text(max_size=8),
                    st.booleans(),
                    st.none(),
                ),
                max_size=3,
            ),
        ),
        max_size=40,
    ),
    st.integers(1, 7),
)
def test_round_trip_property(
    tmp_path_factory: object, rows: list[tuple[str, EventType, dict[str, object]]], chunk: int
) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder, EventStore(Path(folder) / "t.db") as store:
        seqs = {"a": 0, "b": 0}
        events = []
        for job, kind, data in rows:
            seqs[job] += 1
            events.append(Event(job, seqs[job], kind, 1.5, data))
        for start in range(0, len(events), chunk):
            store.write(events[start : start + chunk])
        for job in ("a", "b"):
            assert store.read(job) == [e for e in events if e.job_id == job]


def test_nan_none_and_odd_values_read_back_as_json_would(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainbus.subscribers._store as module

    data = {"loss": math.nan, "inf": -math.inf, "none": None, "tuple": (1, 2), 3: "int key"}
    expected = json.loads(json.dumps(data))
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(module, "orjson", None)
        with EventStore(data_dir / f"{fast}.db") as store:
            store.write([Event("a", 1, EventType.FIT_EPOCH_END, 1.0, data)])
            (event,) = store.read("a")
        assert math.isnan(event.data["loss"]) and event.data["inf"] == -math.inf
        rest = {k: v for k, v in event.data.items() if k != "loss"}
        assert rest == {k: v for k, v in expected.items() if k != "loss"}


def test_a_batch_mixing_plain_events_and_ones_orjson_cannot_write_keeps_every_value(
    data_dir: Path,
) -> None:
    # One transaction: plain events go in as one JSON array; a NaN, a null, a non-string key
    # and a 70-bit integer take the slower path; the order and the values hold
    odd = {5: {"loss": math.nan}, 10: {"metric": None}, 15: {1: "int key"}, 20: {"big": 2**70}}
    events = [
        Event("a", seq, EventType.TRAIN_BATCH_END, 1.0 + seq, odd.get(seq, {"step": seq}))
        for seq in range(1, 40)
    ]
    with EventStore(data_dir / "t.db") as store:
        assert store.write(events) == len(events)
        stored = store.read("a")
    assert [e.seq for e in stored] == list(range(1, 40))
    assert math.isnan(stored[4].data["loss"])
    assert stored[9].data == {"metric": None}
    assert stored[14].data == {"1": "int key"}
    assert stored[19].data == {"big": 2**70}
    plain = [(e.seq, e.time, e.data) for e in stored if e.seq not in odd]
    assert plain == [(e.seq, e.time, e.data) for e in events if e.seq not in odd]


def test_batch_events_go_in_as_one_chunk_a_write_and_read_back_merged_in_order(
    data_dir: Path,
) -> None:
    path = data_dir / "trainbus.db"
    events = [_event("a", seq, KINDS[seq % 3]) for seq in range(1, 61)]
    with EventStore(path) as store:
        store.write(events[:30])
        store.write(events[30:])
        assert store.read("a") == events
        # after a seq in the middle of a chunk, with a type filter and a limit across both
        assert store.read("a", after_seq=7, limit=5) == events[7:12]
        batch_ends = [e for e in events if e.type is EventType.TRAIN_BATCH_END]
        assert (
            store.read("a", types=[EventType.TRAIN_BATCH_END], after_seq=20, limit=4)
            == [e for e in batch_ends if e.seq > 20][:4]
        )
        assert (
            store.read("a", types=["on_fit_epoch_end"], limit=3)
            == [e for e in events if e.type is EventType.FIT_EPOCH_END][:3]
        )
        assert store.last_seq("a") == 60
    with closing(sqlite3.connect(path)) as db:
        # 20 batch events a write: one chunk each; the other 40 events one row each
        assert db.execute("SELECT COUNT(*), SUM(count) FROM batch_events").fetchone() == (2, 20)
        assert db.execute("SELECT COUNT(*) FROM events").fetchone() == (40,)


def test_batch_events_stored_one_row_each_by_an_earlier_version_still_read(
    data_dir: Path,
) -> None:
    path = data_dir / "trainbus.db"
    old = [_event("a", seq) for seq in range(1, 6)]  # train_batch_end, as rows
    with EventStore(path) as store:
        pass  # creates the tables
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?)",
            [(e.job_id, e.seq, e.type.value, e.time, json.dumps(e.data)) for e in old],
        )
    new = [_event("a", seq, KINDS[seq % 3]) for seq in range(6, 16)]
    with EventStore(path, keep_batch_events="none_after_end") as store:
        store.write(new)
        assert store.read("a") == old + new
        assert store.read("a", after_seq=3, limit=4) == (old + new)[3:7]
        assert store.last_seq("a") == 15
        store.write([_event("a", 16, EventType.JOB_COMPLETED)])
        kept = [e.seq for e in store.read("a")]
        assert kept == [e.seq for e in new if e.type is not EventType.TRAIN_BATCH_END] + [16]
        assert store.delete_job("a") == len(kept)
        assert store.read("a") == [] and store.job_ids() == []


READ_KINDS = [
    EventType.TRAIN_BATCH_START,
    EventType.TRAIN_BATCH_END,
    EventType.VAL_BATCH_END,
    EventType.FIT_EPOCH_END,
    EventType.MODEL_SAVE,
]


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.sampled_from(READ_KINDS), min_size=1, max_size=60),
    st.integers(1, 9),
    st.lists(
        st.tuples(
            st.integers(0, 65),
            st.none() | st.sets(st.sampled_from(READ_KINDS)),
            st.none() | st.integers(0, 12),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_reads_after_a_seq_by_types_with_a_limit_match_a_plain_filter(
    kinds: list[EventType],
    writes_of: int,
    reads: list[tuple[int, set[EventType] | None, int | None]],
) -> None:
    # batch events go in as chunks, the others as rows: every read merges both
    import tempfile

    events = [Event("a", seq, kind, 0.5 * seq, {"seq": seq}) for seq, kind in enumerate(kinds, 1)]
    with tempfile.TemporaryDirectory() as folder, EventStore(Path(folder) / "t.db") as store:
        for start in range(0, len(events), writes_of):
            store.write(events[start : start + writes_of])
        for after_seq, types, limit in reads:
            expected = [
                e for e in events if e.seq > after_seq and (types is None or e.type in types)
            ][:limit]
            assert store.read("a", after_seq=after_seq, types=types, limit=limit) == expected


def test_seqs_reserved_before_a_crash_are_never_reused_and_a_gap_names_them(
    data_dir: Path,
) -> None:
    path = data_dir / "trainbus.db"
    crashed = EventStore(path)
    crashed.open()
    crashed.write([_event("job", seq) for seq in range(1, 6)])
    reserved = crashed.reserved_seq("job")
    assert reserved >= 5 + RESERVE_AHEAD // 2  # the live stream may send up to here
    crashed.reserve("job", reserved + 3)  # a burst ran ahead of the store's commits
    reserved = crashed.reserved_seq("job")
    # the server dies here: no close, seqs 6..reserved may have been sent live
    with EventStore(path) as restarted:
        assert restarted.last_seq("job") == reserved + 1  # numbering goes on after the gap
        gap = restarted.read("job", after_seq=5)
        assert [(e.seq, e.type) for e in gap] == [(reserved + 1, EventType.GAP)]
        assert gap[0].data["from_seq"] == 6 and gap[0].data["to_seq"] == reserved
        assert gap[0].data["missed"] == reserved - 5
        restarted.write([_event("job", reserved + 2)])
    with EventStore(path) as after_a_clean_close:  # reservations given back: no new gap
        assert after_a_clean_close.last_seq("job") == reserved + 2
        assert [e.type for e in after_a_clean_close.read("job")].count(EventType.GAP) == 1
    crashed.close()
