"""Per-subscriber buffers: ordering, lossless backpressure, lossy policies with gaps."""

from __future__ import annotations

import threading

import anyio
import anyio.lowlevel
import pytest

from trainbus.bus import DeliveryPolicy, Event, EventBus, EventType, WouldBlock

BATCH_END = EventType.TRAIN_BATCH_END


def publish_in_thread(bus: EventBus, job_id: str, count: int) -> None:
    for step in range(count):
        bus.publish(job_id, BATCH_END, {"step": step})


async def collect(subscription: object, until_closed: bool = True) -> list[Event]:
    events: list[Event] = []
    async for event in subscription:  # type: ignore[attr-defined]
        events.append(event)
    return events


async def test_each_subscriber_sees_its_events_in_seq_order() -> None:
    async with EventBus() as bus:
        everything = bus.subscribe("all")
        only_a = bus.subscribe("a", job_id="a")
        only_epochs = bus.subscribe("epochs", types=["on_train_epoch_end"])
        for i in range(50):
            bus.publish("a" if i % 2 else "b", BATCH_END, {"i": i})
        bus.publish("a", EventType.TRAIN_EPOCH_END, {})
        await bus.aclose()
        seen = await collect(everything)
        seen_a = await collect(only_a)
        seen_epochs = await collect(only_epochs)
    # Order is per job (each job's seq); jobs interleave as the bus pleases.
    assert [e.data["i"] for e in seen if e.job_id == "b"] == list(range(0, 50, 2))
    for job in ("a", "b"):
        seqs = [e.seq for e in seen if e.job_id == job]
        assert seqs == list(range(1, len(seqs) + 1))
    assert {e.job_id for e in seen_a} == {"a"}
    assert [e.seq for e in seen_a] == list(range(1, 27))
    assert [e.type for e in seen_epochs] == [EventType.TRAIN_EPOCH_END]


async def test_lossless_slow_consumer_loses_nothing_and_publisher_waits() -> None:
    count = 3_000
    async with EventBus() as bus:
        subscription = bus.subscribe("slow", buffer_size=16, policy=DeliveryPolicy.LOSSLESS)
        received: list[int] = []

        async def slow_consumer() -> None:
            while True:
                try:
                    batch = await subscription.receive_batch(max_items=8)
                except anyio.EndOfStream:
                    return
                received.extend(e.seq for e in batch)
                await anyio.sleep(0.0005)

        async with anyio.create_task_group() as tg:
            tg.start_soon(slow_consumer)
            await anyio.to_thread.run_sync(publish_in_thread, bus, "job", count)
            await bus.aclose()
        statistics = subscription.statistics()
    assert received == list(range(1, count + 1))
    assert statistics.dropped == 0
    assert statistics.delivered == count
    assert statistics.publisher_wait_seconds > 0


async def test_drop_oldest_announces_every_hole_with_a_gap_event() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("lossy", buffer_size=4, policy="drop_oldest")
        for _ in range(10):
            bus.publish("job", BATCH_END)
        batch = subscription.receive_batch_nowait()
        statistics = subscription.statistics()
    assert batch[0].type is EventType.GAP
    assert batch[0].data == {"from_seq": 1, "to_seq": 6, "missed": 6, "subscriber": "lossy"}
    assert [e.seq for e in batch[1:]] == [7, 8, 9, 10]
    assert statistics.dropped == 6
    assert statistics.gaps == 1


async def test_latest_keeps_only_the_newest_event_once_full() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("latest", buffer_size=3, policy=DeliveryPolicy.LATEST)
        for _ in range(7):
            bus.publish("job", BATCH_END)
        batch = subscription.receive_batch_nowait()
    assert batch[0].type is EventType.GAP
    assert batch[0].data["from_seq"] == 1 and batch[0].data["to_seq"] == 6
    assert [e.seq for e in batch[1:]] == [7]


async def test_publish_nowait_refuses_instead_of_waiting_and_publishes_nothing() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("tiny", buffer_size=2)
        bus.publish_nowait("job", BATCH_END)
        bus.publish_nowait("job", BATCH_END)
        with pytest.raises(WouldBlock):
            bus.publish_nowait("job", BATCH_END)
        assert bus.last_seq("job") == 2
        assert [e.seq for e in subscription.receive_batch_nowait()] == [1, 2]
        assert bus.publish_nowait("job", BATCH_END).seq == 3


async def test_try_publish_many_publishes_a_whole_batch_or_nothing() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("small", buffer_size=4)
        assert [e.seq for e in bus.try_publish_many("job", [(BATCH_END, {})] * 3) or []] == [
            1, 2, 3
        ]
        # two more do not fit beside the three unread: neither is published, nothing waits
        assert bus.try_publish_many("job", [(BATCH_END, {})] * 2) is None
        assert bus.last_seq("job") == 3
        assert [e.seq for e in subscription.receive_batch_nowait()] == [1, 2, 3]
        published = bus.try_publish_many("job", [(BATCH_END, {})] * 2)
        assert published is not None and [e.seq for e in published] == [4, 5]


async def test_publish_async_waits_for_room_without_blocking_the_loop() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("tiny", buffer_size=1)
        bus.publish("job", BATCH_END)
        published = anyio.Event()

        async def publisher() -> None:
            await bus.publish_async("job", BATCH_END)
            published.set()

        async with anyio.create_task_group() as tg:
            tg.start_soon(publisher)
            await anyio.wait_all_tasks_blocked()
            assert not published.is_set()  # the loop is free: we are running
            assert (await subscription.receive()).seq == 1
            with anyio.fail_after(5):
                await published.wait()
        assert (await subscription.receive()).seq == 2


async def test_a_thread_blocked_on_a_full_buffer_is_released_by_close() -> None:
    async with EventBus() as bus:
        bus.subscribe("never-read", buffer_size=1)
        bus.publish("job", BATCH_END)
        outcome: list[str] = []

        def blocked_publisher() -> None:
            try:
                bus.publish("job", BATCH_END)
                outcome.append("published")
            except Exception as error:
                outcome.append(type(error).__name__)

        thread = threading.Thread(target=blocked_publisher)
        thread.start()
        await bus.aclose(timeout=0.1)
        await anyio.to_thread.run_sync(thread.join, 5)
    assert outcome == ["BusClosed"]


async def test_batches_respect_max_items_and_iteration_ends_after_close() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("s")
        for _ in range(5):
            bus.publish("job", BATCH_END)
        assert len(await subscription.receive_batch(max_items=2)) == 2
        await bus.aclose()
        assert [e.seq for e in await collect(subscription)] == [3, 4, 5]
        with pytest.raises(anyio.EndOfStream):
            await subscription.receive()


async def test_a_stalled_lossless_subscriber_of_one_job_never_holds_back_another_job() -> None:
    async with EventBus() as bus:
        bus.subscribe("stalled-on-a", job_id="a", buffer_size=4)
        for _ in range(4):
            bus.publish_nowait("a", BATCH_END)
        with pytest.raises(WouldBlock):
            bus.publish_nowait("a", BATCH_END)
        # Job b is unaffected: thousands of events go through without waiting.
        await anyio.to_thread.run_sync(publish_in_thread, bus, "b", 5_000)
        assert bus.last_seq("b") == 5_000


async def test_close_keeps_what_was_buffered_but_takes_nothing_new() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("closing")
        for _ in range(3):
            bus.publish("job", BATCH_END)
        subscription.close()
        bus.publish("job", BATCH_END)
        assert [e.seq for e in await collect(subscription)] == [1, 2, 3]
        assert subscription.closed


async def test_a_gap_counts_as_one_item_and_no_event_after_it_is_lost() -> None:
    async with EventBus() as bus:
        one_by_one = bus.subscribe("one", buffer_size=3, policy="drop_oldest")
        two_by_two = bus.subscribe("two", buffer_size=3, policy="drop_oldest")
        for _ in range(10):
            bus.publish("job", BATCH_END)
        received = []
        while True:
            try:
                received.append(one_by_one.receive_nowait())
            except WouldBlock:
                break
        batches = [await two_by_two.receive_batch(2), await two_by_two.receive_batch(2)]
    gap, *events = received
    assert gap.type is EventType.GAP
    assert (gap.data["from_seq"], gap.data["to_seq"], gap.data["missed"]) == (1, 7, 7)
    assert [e.seq for e in events] == [8, 9, 10]
    assert [[e.seq for e in batch] for batch in batches] == [[7, 8], [9, 10]]
    assert batches[0][0].type is EventType.GAP


async def test_receive_after_a_gap_returns_the_next_event_next() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("lossy", buffer_size=2, policy="latest")
        for _ in range(5):
            bus.publish("job", BATCH_END)
        gap = await subscription.receive()
        bus.publish("job", BATCH_END)
        with anyio.fail_after(5):
            assert [(await subscription.receive()).seq for _ in range(2)] == [5, 6]
        statistics = subscription.statistics()
    assert (gap.type, gap.data["missed"]) == (EventType.GAP, 4)
    assert (statistics.delivered, statistics.dropped, statistics.gaps) == (2, 4, 1)


def publish_epochs(bus: EventBus, epochs: int, batches: int) -> list[Event]:
    """Publish ``epochs`` epochs of ``batches`` batch events each; return the epoch events."""
    epoch_events = []
    for epoch in range(epochs):
        for step in range(batches):
            bus.publish("job", BATCH_END, {"step": step})
        epoch_events.append(bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": epoch}))
    return epoch_events


async def test_a_lossy_filtering_buffer_counts_only_its_own_events() -> None:
    async with EventBus() as bus:
        epochs = bus.subscribe(
            "epochs", types=[EventType.FIT_EPOCH_END], buffer_size=16, policy="drop_oldest"
        )
        published = publish_epochs(bus, 3, 100)
        received = epochs.receive_batch_nowait()
        statistics = epochs.statistics()
    assert received == published
    assert (statistics.dropped, statistics.gaps) == (0, 0)


async def test_a_lossy_filtering_reader_loses_only_its_oldest_own_events() -> None:
    # Enough events that the log is trimmed past the idle reader several times.
    async with EventBus() as bus:
        epochs = bus.subscribe(
            "epochs", types=[EventType.FIT_EPOCH_END], buffer_size=16, policy="drop_oldest"
        )
        latest = bus.subscribe(
            "latest", types=[EventType.FIT_EPOCH_END], buffer_size=16, policy="latest"
        )
        published = publish_epochs(bus, 40, 100)
        before = epochs.statistics()
        gap, *received = epochs.receive_batch_nowait()
        latest_gap, *latest_received = latest.receive_batch_nowait()
        after = epochs.statistics()
    assert (before.buffered, before.dropped) == (16, 24)
    assert gap.type is EventType.GAP
    assert gap.data["missed"] == 24
    assert (gap.data["from_seq"], gap.data["to_seq"]) == (published[0].seq, published[23].seq)
    assert received == published[24:]
    assert (after.delivered, after.dropped, after.gaps, after.buffered) == (16, 24, 1, 0)
    assert latest_gap.data["missed"] == 39 and latest_received == published[-1:]


async def test_a_batch_keeps_consecutive_seqs_while_another_thread_publishes() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("small", buffer_size=8)
        batches: list[list[Event]] = []
        received: list[int] = []

        async def consume() -> None:
            while True:
                try:
                    batch = await subscription.receive_batch(max_items=3)
                except anyio.EndOfStream:
                    return
                received.extend(e.seq for e in batch)
                await anyio.lowlevel.checkpoint()

        def publish_batches() -> None:
            for _ in range(20):
                batches.append(bus.publish_many("job", [(BATCH_END, {})] * 20))

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            async with anyio.create_task_group() as publishers:
                publishers.start_soon(anyio.to_thread.run_sync, publish_batches)
                publishers.start_soon(anyio.to_thread.run_sync, publish_in_thread, bus, "job", 400)
            await bus.aclose()
    for batch in batches:
        seqs = [e.seq for e in batch]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert received == list(range(1, 801))
