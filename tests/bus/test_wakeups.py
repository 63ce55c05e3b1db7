"""Wake-ups from publishing threads: coalesced rounds that stretch while a job publishes fast,
yet never hold back a publisher waiting for room or a thread waiting for its subscribers;
``publish_many``."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import anyio
import pytest

from trainbus.bus import BusClosed, Event, EventBus, EventType, Subscriber

BATCH_END = EventType.TRAIN_BATCH_END


class BatchCounter(Subscriber):
    """Counts the batches it is handed (one per wake-up round) and keeps every event."""

    buffer_size = 1_000_000
    max_batch = 1_000_000

    def __init__(self) -> None:
        self.batches = 0
        self.events: list[Event] = []

    async def on_events(self, events: Sequence[Event]) -> None:
        self.batches += 1
        self.events.extend(events)


class SmallBuffer(BatchCounter):
    buffer_size = 4


async def test_a_thread_waiting_for_its_subscribers_is_not_held_to_the_next_round() -> None:
    counter = BatchCounter()
    async with EventBus(wake_interval=2.0, max_wake_interval=2.0) as bus:
        bus.attach(counter)

        def publish_twice_and_wait() -> float:
            first = bus.publish("job", BATCH_END, {"step": 0})  # after quiet: woken at once
            assert bus.wait_processed(first, 10)
            # The coalescer now sleeps 2 s before its next round; an epoch end cannot wait.
            last = bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": 0})
            started = time.monotonic()
            assert bus.wait_processed(last, 10)
            return time.monotonic() - started

        waited = await anyio.to_thread.run_sync(publish_twice_and_wait)
    assert waited < 1.0
    assert [e.seq for e in counter.events] == [1, 2]


async def test_a_publisher_waiting_for_room_wakes_the_full_subscriber_at_once() -> None:
    counter = SmallBuffer()
    total = 60
    async with EventBus(wake_interval=2.0, max_wake_interval=2.0) as bus:
        bus.attach(counter)

        def publish_all() -> float:
            started = time.monotonic()
            for step in range(total):
                last = bus.publish("job", BATCH_END, {"step": step})
            assert bus.wait_processed(last, 30)
            return time.monotonic() - started

        elapsed = await anyio.to_thread.run_sync(publish_all)
    # Held to 2 s rounds, 60 events through a 4-event buffer would take about 30 s.
    assert elapsed < 5.0
    assert [e.data["step"] for e in counter.events] == list(range(total))


async def test_a_fast_publisher_is_delivered_in_few_rounds_without_loss() -> None:
    counter = BatchCounter()
    wake_interval, max_wake_interval = 0.001, 0.05
    async with EventBus(wake_interval=wake_interval, max_wake_interval=max_wake_interval) as bus:
        bus.attach(counter)

        def publish_for(seconds: float) -> tuple[int, float]:
            started = time.monotonic()
            published = 0
            while time.monotonic() - started < seconds:
                for _ in range(100):
                    published += 1
                    last = bus.publish("job", BATCH_END, {"step": published})
            assert bus.wait_processed(last, 30)
            return published, time.monotonic() - started

        published, elapsed = await anyio.to_thread.run_sync(publish_for, 0.6)
    # Fixed 1 ms rounds would be hundreds (or one per GIL switch, every 5 ms: over 100). The
    # interval doubles each busy round up to 50 ms: about elapsed / 50 ms + a 6-round ramp.
    assert counter.batches <= elapsed / max_wake_interval + 30
    assert [e.data["step"] for e in counter.events] == list(range(1, published + 1))


async def test_publish_many_numbers_events_consecutively_in_order() -> None:
    counter = BatchCounter()
    async with EventBus() as bus:
        bus.attach(counter)
        bus.publish("job", EventType.TRAIN_START, {"epochs": 1})
        events = bus.publish_many(
            "job",
            [
                (EventType.OPTIMIZER_STEP, {"step": 1}),
                ("on_before_zero_grad", {"step": 1}),  # callback names work as in publish
                (BATCH_END, {"step": 1, "loss": 0.5}),
            ],
        )
        assert [e.seq for e in events] == [2, 3, 4]
        assert [e.type for e in events] == [
            EventType.OPTIMIZER_STEP,
            EventType.BEFORE_ZERO_GRAD,
            BATCH_END,
        ]
        assert len({e.time for e in events}) == 1
        assert bus.publish("job", BATCH_END).seq == 5
        await bus.aclose()
        with pytest.raises(BusClosed):
            bus.publish_many("job", [(BATCH_END, {})])
    assert [e.seq for e in counter.events] == [1, 2, 3, 4, 5]
    assert counter.events[1:4] == events


async def test_publish_many_waits_for_room_in_a_small_lossless_buffer() -> None:
    counter = SmallBuffer()
    async with EventBus() as bus:
        bus.attach(counter)

        def publish_in_groups() -> None:
            for group in range(10):
                items = [(BATCH_END, {"step": group * 10 + i}) for i in range(10)]
                last = bus.publish_many("job", items)[-1]
            assert bus.wait_processed(last, 30)

        await anyio.to_thread.run_sync(publish_in_groups)
        statistics = bus.statistics().subscriptions[0]
    assert [e.data["step"] for e in counter.events] == list(range(100))
    assert statistics.dropped == 0


async def test_a_bulk_of_events_is_delivered_at_once_each_time_without_rounds() -> None:
    # A trainer publishes its batch events in bulks of hundreds: each is a batch already, and
    # reaches the readers at once, not at the coalescer's next round (1 s here). A small bulk
    # joins the rounds like single events do.
    class Arrivals(BatchCounter):
        def __init__(self) -> None:
            super().__init__()
            self.seen = threading.Condition()

        async def on_events(self, events: Sequence[Event]) -> None:
            await super().on_events(events)
            with self.seen:
                self.seen.notify_all()

    arrivals = Arrivals()
    async with EventBus(wake_interval=1.0, max_wake_interval=1.0) as bus:
        bus.attach(arrivals)

        def delivery_seconds(size: int, step: int) -> float:
            items = [(BATCH_END, {"step": step + i}) for i in range(size)]
            started = time.monotonic()
            last = bus.publish_many("job", items)[-1]
            with arrivals.seen:
                arrivals.seen.wait_for(
                    lambda: arrivals.events[-1:] and arrivals.events[-1].seq == last.seq, 10
                )
            return time.monotonic() - started

        bulks = [await anyio.to_thread.run_sync(delivery_seconds, 200, 200 * i) for i in range(3)]
        small = [await anyio.to_thread.run_sync(delivery_seconds, 4, 600 + 4 * i) for i in range(2)]
    assert max(bulks) < 0.5, bulks
    assert small[1] > 0.5, small  # the first small one after quiet goes at once; then rounds
    assert [e.data["step"] for e in arrivals.events] == list(range(608))
    assert arrivals.batches == 5


async def test_processed_seq_counts_events_a_filter_skips_as_handled() -> None:
    class EpochEnds(Subscriber):
        async def on_fit_epoch_end(self, event: Event) -> None:
            pass

    async with EventBus() as bus:
        handle = bus.attach(EpochEnds())
        for step in range(5):
            bus.publish("job", BATCH_END, {"step": step})
        epoch_end = bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": 0})
        assert await anyio.to_thread.run_sync(bus.wait_processed, epoch_end, 10)
        assert handle.processed_seq("job") == epoch_end.seq == 6
        assert handle.processed_seq("other job") == 0


async def test_threads_waiting_on_a_busy_bus_each_return_without_waiting_for_rounds() -> None:
    counters = [BatchCounter() for _ in range(3)]
    async with EventBus(wake_interval=1.0, max_wake_interval=2.0) as bus:
        for counter in counters:
            bus.attach(counter)
        results: list[bool] = []

        def publish_and_wait(job: str) -> None:
            for step in range(200):
                event = bus.publish(job, BATCH_END, {"step": step})
                if step % 50 == 49:
                    results.append(bus.wait_processed(event, 10))

        threads = [threading.Thread(target=publish_and_wait, args=(f"job-{i}",)) for i in range(3)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            await anyio.to_thread.run_sync(thread.join)
        elapsed = time.monotonic() - started
    assert results == [True] * 12
    assert elapsed < 2.0  # each thread waits 4 times: held to rounds, at least 4 s
    for counter in counters:
        assert len(counter.events) == 600


class SlowBatchCounter(BatchCounter):
    """Pays per batch (as a store pays a transaction): gathering gives it fuller batches."""

    async def on_events(self, events: Sequence[Event]) -> None:
        await anyio.sleep(0.005)
        await super().on_events(events)


async def test_a_subscriber_that_pays_per_batch_gathers_while_the_bus_is_busy() -> None:
    counter = SlowBatchCounter()
    async with EventBus(wake_interval=0.001, max_wake_interval=0.05) as bus:
        bus.attach(counter)

        def paced_publish_for(seconds: float) -> tuple[int, float]:
            started = time.monotonic()
            published = 0
            while time.monotonic() - started < seconds:
                for _ in range(10):  # a training step's events, then the step itself
                    published += 1
                    last = bus.publish("job", BATCH_END, {"step": published})
                time.sleep(0.0005)  # pacing the producer, not waiting for anything
            assert bus.wait_processed(last, 30)
            return published, time.monotonic() - started

        published, elapsed = await anyio.to_thread.run_sync(paced_publish_for, 0.6)
    # Taking whatever is buffered after each 5 ms batch would make over 100 batches.
    assert counter.batches <= elapsed / 0.05 + 30
    assert [e.data["step"] for e in counter.events] == list(range(1, published + 1))


class EpochEndWatcher(Subscriber):
    buffer_size = 8

    def __init__(self) -> None:
        self.epochs: list[int] = []

    async def on_fit_epoch_end(self, event: Event) -> None:
        self.epochs.append(event.data["epoch"])


async def test_a_filtering_lossless_subscriber_never_holds_publishers_of_other_types() -> None:
    watcher = EpochEndWatcher()
    async with EventBus() as bus:
        handle = bus.attach(watcher)

        def train() -> None:
            for epoch in range(3):
                for step in range(500):  # far more than the watcher's 8-event buffer
                    bus.publish("job", BATCH_END, {"step": step})
                event = bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": epoch})
                assert bus.wait_processed(event, 10)

        await anyio.to_thread.run_sync(train)
        statistics = handle.subscription.statistics()
    assert watcher.epochs == [0, 1, 2]
    assert statistics.publisher_wait_seconds == 0.0
    assert statistics.delivered == 3


async def test_a_lossy_filtering_reader_still_hears_of_what_it_lost() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe(
            "lossy", types=[BATCH_END], buffer_size=4, policy="drop_oldest"
        )
        for step in range(20):
            bus.publish("job", EventType.OPTIMIZER_STEP, {"step": step})
            bus.publish("job", BATCH_END, {"step": step})
        batch = subscription.receive_batch_nowait()
    gap, *events = batch
    assert gap.type is EventType.GAP
    # The buffer holds the last 4 events of its own type (steps 16-19); of the others it
    # hears only how many of its own it lost (steps 0-15, seq 2 to 32).
    assert [e.data["step"] for e in events] == [16, 17, 18, 19]
    assert (gap.data["from_seq"], gap.data["to_seq"], gap.data["missed"]) == (2, 32, 16)
