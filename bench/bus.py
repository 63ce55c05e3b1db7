"""Bus throughput: one publishing thread, four subscribers (two lossless, two drop_oldest).

Baseline in the same process: one anyio memory object stream per subscriber, fed from the
thread through ``anyio.from_thread`` (the naive design). Last line: one JSON object.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import statistics
import time

import anyio
import anyio.from_thread
from anyio.streams.memory import MemoryObjectReceiveStream

from trainbus.bus import DeliveryPolicy, EventBus, EventType, Subscription

JOB = "bench"
POLICIES = (
    DeliveryPolicy.LOSSLESS,
    DeliveryPolicy.LOSSLESS,
    DeliveryPolicy.DROP_OLDEST,
    DeliveryPolicy.DROP_OLDEST,
)


async def consume(subscription: Subscription) -> tuple[int, int]:
    """Consume until the bus closes, checking every event's order; return (seen, missed)."""
    expected = 1
    seen = 0
    missed = 0
    gap = EventType.GAP  # enum attribute lookups are slow; hoist out of the loop
    while True:
        try:
            batch = await subscription.receive_batch()
        except anyio.EndOfStream:
            return seen, missed
        start = 0
        while start < len(batch) and batch[start].type is gap:
            notice = batch[start].data
            if notice["from_seq"] != expected:
                raise AssertionError(f"{subscription.name}: gap from {notice['from_seq']}")
            missed += notice["missed"]
            expected = notice["to_seq"] + 1
            start += 1
        # Every remaining event is checked, in C-speed list operations: seq must run on
        # from the last one without a hole (a lossy buffer only ever loses its oldest).
        seqs = [event.seq for event in batch[start:]]
        if seqs != list(range(expected, expected + len(seqs))):
            raise AssertionError(f"{subscription.name}: out of order or missing events")
        expected += len(seqs)
        seen += len(seqs)


def publish_from_thread(bus: EventBus, n: int, samples: list[int]) -> float:
    """Publish ``n`` batch events as a training loop does; time one publish in 64."""
    data = {"loss": 0.5, "step": 0}
    publish = bus.publish
    batch_end = EventType.TRAIN_BATCH_END
    clock = time.perf_counter_ns
    untimed = range(63)
    started = time.perf_counter()
    for _ in range(n // 64):
        t0 = clock()
        publish(JOB, batch_end, data)
        samples.append(clock() - t0)
        for _ in untimed:
            publish(JOB, batch_end, data)
    for _ in range(n % 64):
        publish(JOB, batch_end, data)
    return time.perf_counter() - started


async def run_trainbus(n: int, buffer_size: int) -> dict[str, float]:
    results: list[tuple[int, int]] = []
    samples: list[int] = []
    async with EventBus() as bus, anyio.create_task_group() as tg:
        subscriptions = [
            bus.subscribe(f"s{i}", policy=p, buffer_size=buffer_size)
            for i, p in enumerate(POLICIES)
        ]

        async def run(s: Subscription) -> None:
            results.append(await consume(s))

        for s in subscriptions:
            tg.start_soon(run, s)
        started = time.perf_counter()
        await anyio.to_thread.run_sync(publish_from_thread, bus, n, samples)
        await bus.aclose()
    elapsed = time.perf_counter() - started
    by_name = {s.name: s.statistics() for s in subscriptions}
    lossless_seen = [by_name[f"s{i}"].delivered for i in (0, 1)]
    return {
        "events_per_s": n / elapsed,
        "publish_ns_p50": statistics.median(samples),
        "lost": sum(n - seen for seen in lossless_seen),
        "lossy_dropped": sum(by_name[f"s{i}"].dropped for i in (2, 3)),
        "lossy_accounted": all(seen + missed == n for seen, missed in results),
    }


async def run_naive(n: int, buffer_size: int) -> dict[str, float]:
    """The naive design: one memory stream per subscriber, one from_thread call per event."""
    streams = [anyio.create_memory_object_stream[object](buffer_size) for _ in POLICIES]
    counts: list[int] = []

    async def drain(receive: MemoryObjectReceiveStream[object]) -> None:
        count = 0
        async with receive:
            async for _ in receive:
                count += 1
        counts.append(count)

    def produce() -> None:
        data = {"loss": 0.5, "step": 0}
        for seq in range(1, n + 1):
            event = (JOB, seq, EventType.TRAIN_BATCH_END, time.time(), data)
            for send, _ in streams:
                anyio.from_thread.run(send.send, event)
        for send, _ in streams:
            anyio.from_thread.run_sync(send.close)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        for _, receive in streams:
            tg.start_soon(drain, receive)
        await anyio.to_thread.run_sync(produce)
    elapsed = time.perf_counter() - started
    return {"events_per_s": n / elapsed, "lost": sum(n - c for c in counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--naive-events", type=int, default=20_000)
    parser.add_argument("--buffer-size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    best: dict[str, float] | None = None
    naive_best: dict[str, float] | None = None
    lost = 0
    for round_ in range(args.rounds):
        result = anyio.run(run_trainbus, args.events, args.buffer_size)
        naive = anyio.run(run_naive, args.naive_events, args.buffer_size)
        lost += int(result["lost"])
        print(
            f"round {round_ + 1}: trainbus {result['events_per_s']:>12,.0f} ev/s "
            f"(publish p50 {result['publish_ns_p50']:,.0f} ns, lost {result['lost']}, "
            f"lossy dropped {result['lossy_dropped']}, gaps account for all: "
            f"{result['lossy_accounted']}) | naive {naive['events_per_s']:>10,.0f} ev/s"
        )
        if not result["lossy_accounted"]:
            raise SystemExit("a lossy subscriber missed events that no gap announced")
        if best is None or result["events_per_s"] > best["events_per_s"]:
            best = result
        if naive_best is None or naive["events_per_s"] > naive_best["events_per_s"]:
            naive_best = naive
    assert best is not None and naive_best is not None
    print(
        json.dumps(
            {
                "bench": "bus",
                "events_per_s": round(best["events_per_s"]),
                "publish_ns_p50": round(best["publish_ns_p50"]),
                "naive_events_per_s": round(naive_best["events_per_s"]),
                "ratio_vs_naive": round(best["events_per_s"] / naive_best["events_per_s"], 1),
                "lost": lost,
            }
        )
    )


if __name__ == "__main__":
    main()
