"""The trackers' shared machinery: past its bound a tracker that is down drops the oldest
per-step records (counted, and said in an event), keeps the start and the end, and writes
the rest once it answers again."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import anyio

from trainbus.bus import EventBus, EventType, SubscriberHandle
from trainbus.subscribers import TrackerSubscriber
from trainbus.subscribers._trackers import RecordKind, TrackerBackend, TrackerRecord

from .tracker_jobs import digits_spec, run_job


class DownUntilReleased:
    """A tracker that refuses every write until the test releases it."""

    def __init__(self, up: threading.Event) -> None:
        self.up = up
        self.written: list[TrackerRecord] = []

    def write(self, records: Sequence[TrackerRecord]) -> None:
        if not self.up.is_set():
            raise ConnectionRefusedError("tracker down")
        self.written.extend(records)

    def close(self) -> None:
        pass


class Tracked(TrackerSubscriber):
    tracker = "test"

    def __init__(self, backend: DownUntilReleased, **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.backend = backend

    def make_backend(self) -> TrackerBackend:
        return self.backend


async def test_down_tracker_drops_oldest_steps_past_the_bound_and_keeps_start_and_end(
    data_dir: Path,
) -> None:
    up = threading.Event()
    backend = DownUntilReleased(up)
    subscribers: list[Tracked] = []

    def build(bus: EventBus) -> list[Tracked]:
        subscribers.append(
            Tracked(
                backend,
                job_id="buf-1",
                bus=bus,
                params={"a": {"b": 1}},
                log_every_n_steps=1,
                max_buffered=20,
                retry_initial=0.01,
                retry_max=0.05,
                close_timeout=10.0,
            )
        )
        return subscribers

    async def release(bus: EventBus, handles: list[SubscriberHandle]) -> None:
        # the tracker has taken every event of the job while down, then it answers again
        last = bus.last_seq("buf-1")
        assert await anyio.to_thread.run_sync(handles[-1].wait_processed, "buf-1", last, 30.0)
        up.set()

    job_dir = data_dir / "jobs" / "buf-1"
    run = await run_job("buf-1", digits_spec(), job_dir, build, after_run=release)
    [tracker] = subscribers
    stats = tracker.statistics()
    kinds = [record.kind for record in backend.written]
    assert kinds[0] is RecordKind.START and backend.written[0].values == {"a.b": 1}
    assert kinds[-1] is RecordKind.END and backend.written[-1].values == {"state": "completed"}
    assert stats.failures > 0 and stats.dropped > 0
    assert stats.written == len(backend.written)
    batches = len(run.of(EventType.TRAIN_BATCH_END))
    assert stats.written + stats.dropped >= batches  # every record written or counted
    # the newest steps survive: the last epoch's metrics are there
    last_epoch = run.of(EventType.FIT_EPOCH_END)[-1]
    last_step = last_epoch.data["step"]
    assert any(r.step == last_step and "val_loss" in r.values for r in backend.written)
    written_indexes = [record.index for record in backend.written]
    assert written_indexes == sorted(set(written_indexes))  # in order, none twice
    errors = run.of(EventType.SUBSCRIBER_ERROR)
    # the outage, said once (a drop may be said before it: records can outrun the first try)
    outages = [e for e in errors if e.data["error_type"] == "ConnectionRefusedError"]
    assert len(outages) == 1 and outages[0].data["subscriber"] == "test_tracker"
    dropped = [e for e in errors if e.data["error_type"] == "TrackerRecordsDropped"]
    assert len(dropped) == 1  # said once, not once per record
    assert errors[-1].data["error_type"] == "TrackerRecovered"
    assert errors[-1].data["dropped_total"] == stats.dropped
