"""Event store throughput: events published from a training thread, written to SQLite.

One thread publishes ``train_batch_end``-sized events into the bus; the ``EventStore`` is
attached (lossless) and commits them in batched transactions. The rate counts from the
first publish until every event is committed. A second figure writes directly (no bus).
Last line: one JSON object.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import tempfile
import time
from pathlib import Path

import anyio

from trainbus.bus import Event, EventBus, EventType
from trainbus.subscribers import EventStore

JOB = "bench"


def _data(i: int) -> dict[str, object]:
    return {"epoch": i // 1000, "step": i, "batch": i % 1000, "loss": 0.5 + i * 1e-7}


async def through_the_bus(path: Path, n: int) -> float:
    store = EventStore(path)
    async with EventBus() as bus:
        handle = bus.attach(store)
        await anyio.to_thread.run_sync(store.open)

        def publish() -> Event:
            event = None
            kind = EventType.TRAIN_BATCH_END
            for i in range(n):
                event = bus.publish(JOB, kind, _data(i))
            assert event is not None
            return event

        started = time.perf_counter()
        last = await anyio.to_thread.run_sync(publish)
        assert await anyio.to_thread.run_sync(bus.wait_processed, last, 120.0)
        elapsed = time.perf_counter() - started
        await handle.detach()
    assert store.last_seq(JOB) == n and len(store.read(JOB, after_seq=n - 10)) == 10
    store.close()
    return n / elapsed


def direct(path: Path, n: int, batch: int = 4096) -> float:
    events = [Event(JOB, i + 1, EventType.TRAIN_BATCH_END, time.time(), _data(i)) for i in range(n)]
    with EventStore(path) as store:
        started = time.perf_counter()
        for start in range(0, n, batch):
            store.write(events[start : start + batch])
        return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=300_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rate = anyio.run(through_the_bus, Path(folder) / "bus.db", args.events)
        raw = direct(Path(folder) / "direct.db", args.events)
    print(f"{'path':<28}{'events/s':>12}")
    print(f"{'bus -> EventStore':<28}{rate:>12,.0f}")
    print(f"{'EventStore.write directly':<28}{raw:>12,.0f}")
    print(
        json.dumps(
            {"bench": "store", "events_per_s": round(rate), "direct_events_per_s": round(raw)}
        )
    )


if __name__ == "__main__":
    main()
