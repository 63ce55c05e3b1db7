"""The bus as a whole: sequencing across threads, attached subscribers, drain on close."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import partial

import anyio
import pytest

from trainbus.bus import (
    BusClosed,
    BusError,
    DeliveryPolicy,
    Event,
    EventBus,
    EventType,
    Subscriber,
)

BATCH_END = EventType.TRAIN_BATCH_END


async def test_seq_is_gap_free_and_increasing_with_many_publishing_threads() -> None:
    threads, per_thread = 4, 2_000
    async with EventBus() as bus:
        subscription = bus.subscribe("all", buffer_size=256)
        received: list[Event] = []

        async def consume() -> None:
            async for event in subscription:
                received.append(event)

        def publisher(index: int) -> None:
            for step in range(per_thread):
                bus.publish("job", BATCH_END, {"thread": index, "step": step})

        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            workers = [threading.Thread(target=publisher, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                await anyio.to_thread.run_sync(worker.join)
            await bus.aclose()
    assert [e.seq for e in received] == list(range(1, threads * per_thread + 1))
    for index in range(threads):
        steps = [e.data["step"] for e in received if e.data["thread"] == index]
        assert steps == list(range(per_thread))


class Recorder(Subscriber):
    def __init__(self, name: str = "recorder") -> None:
        self._name = name
        self.events: list[Event] = []

    @property
    def name(self) -> str:
        return self._name

    async def on_event(self, event: Event) -> None:
        self.events.append(event)


class EpochCounter(Subscriber):
    """Only a per-type handler: the subscription is filtered to that type."""

    def __init__(self) -> None:
        self.epochs: list[int] = []

    async def on_train_epoch_end(self, event: Event) -> None:
        self.epochs.append(event.data["epoch"])


class Exploding(Subscriber):
    async def on_train_batch_end(self, event: Event) -> None:
        if event.data["step"] % 2:
            raise RuntimeError(f"boom at {event.data['step']}")


async def test_handlers_are_dispatched_by_type_and_filters_follow_them() -> None:
    counter = EpochCounter()
    assert counter.subscribed_types() == frozenset({EventType.TRAIN_EPOCH_END})
    assert counter.name == "epoch_counter"
    async with EventBus() as bus:
        handle = bus.attach(counter)
        for epoch in range(3):
            bus.publish("job", BATCH_END, {"step": epoch})
            bus.publish("job", "on_train_epoch_end", {"epoch": epoch})
        await bus.aclose()
    assert counter.epochs == [0, 1, 2]
    assert handle.subscription.statistics().delivered == 3


async def test_a_raising_subscriber_is_reported_and_isolated() -> None:
    healthy = Recorder()
    async with EventBus() as bus:
        failing = bus.attach(Exploding())
        bus.attach(healthy)
        for step in range(6):
            last = bus.publish("job", BATCH_END, {"step": step})
        assert await anyio.to_thread.run_sync(bus.wait_processed, last, 10)
        await bus.aclose()
    errors = [e for e in healthy.events if e.type is EventType.SUBSCRIBER_ERROR]
    assert [e.data["event_seq"] for e in errors] == [2, 4, 6]
    assert errors[0].data["subscriber"] == "exploding"
    assert errors[0].data["error_type"] == "RuntimeError"
    assert errors[0].data["message"] == "boom at 1"
    batch_steps = [e.data["step"] for e in healthy.events if e.type is BATCH_END]
    assert batch_steps == list(range(6))
    assert failing.subscription.statistics().errors == 3


class SlowBatchWriter(Subscriber):
    """A batch consumer that takes its time: close must still drain it."""

    buffer_size = 8
    max_batch = 4

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self.stopped = False

    async def on_events(self, events: Sequence[Event]) -> None:
        await anyio.sleep(0.001)
        self.seqs.extend(e.seq for e in events)

    async def on_stop(self) -> None:
        self.stopped = True


async def test_close_drains_lossless_subscribers_before_returning() -> None:
    writer = SlowBatchWriter()
    async with EventBus() as bus:
        bus.attach(writer)
        await anyio.to_thread.run_sync(lambda: [bus.publish("job", BATCH_END) for _ in range(200)])
        await bus.aclose(timeout=30)
        assert writer.seqs == list(range(1, 201))
        assert writer.stopped
        with pytest.raises(BusClosed):
            bus.publish("job", BATCH_END)


async def test_a_stuck_subscriber_is_cancelled_after_the_drain_timeout() -> None:
    class Stuck(Subscriber):
        async def on_event(self, event: Event) -> None:
            await anyio.sleep_forever()

    async with EventBus(drain_timeout=0.2) as bus:
        handle = bus.attach(Stuck())
        bus.publish("job", BATCH_END)
        with anyio.fail_after(10):
            await bus.aclose()
            await handle.finished.wait()


async def test_wait_processed_lets_a_thread_wait_for_lossless_subscribers() -> None:
    class Gate(Subscriber):
        def __init__(self) -> None:
            self.release = anyio.Event()

        async def on_fit_epoch_end(self, event: Event) -> None:
            await self.release.wait()

    gate = Gate()
    async with EventBus() as bus:
        bus.attach(gate)
        bus.attach(Recorder("lossy-observer")).subscription.policy  # noqa: B018
        event = bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": 0})
        assert not await anyio.to_thread.run_sync(bus.wait_processed, event, 0.05)
        gate.release.set()
        assert await anyio.to_thread.run_sync(bus.wait_processed, event, 10)
        other = bus.publish("job", BATCH_END)
        # Gate does not receive batch events, so only the recorder matters for this one.
        assert await anyio.to_thread.run_sync(bus.wait_processed, other, 10)


async def test_training_waits_for_steering_subscribers_not_for_recorders() -> None:
    class SlowRecorder(Subscriber):
        steers_training = False

        def __init__(self) -> None:
            self.release = anyio.Event()

        async def on_fit_epoch_end(self, event: Event) -> None:
            await self.release.wait()

    class Controller(Subscriber):
        def __init__(self) -> None:
            self.seen: list[int] = []

        async def on_fit_epoch_end(self, event: Event) -> None:
            self.seen.append(event.seq)

    recorder, controller = SlowRecorder(), Controller()
    async with EventBus() as bus:
        bus.attach(recorder)
        bus.attach(controller)
        event = bus.publish("job", EventType.FIT_EPOCH_END, {"epoch": 0})
        wait = partial(bus.wait_processed, event, 10, steering_only=True)
        assert await anyio.to_thread.run_sync(wait)
        assert controller.seen == [event.seq]
        # the recorder is still holding the event: a plain wait_processed waits for it too
        assert not await anyio.to_thread.run_sync(bus.wait_processed, event, 0.05)
        recorder.release.set()
        assert await anyio.to_thread.run_sync(bus.wait_processed, event, 10)


async def test_a_failure_a_subscriber_caught_itself_is_counted_and_published() -> None:
    recorder = Recorder()
    async with EventBus() as bus:
        handle = bus.attach(recorder)
        reports = bus.subscribe("reports", types=["subscriber_error"])
        data = {"subscriber": recorder.name, "message": "disk full"}
        event = await anyio.to_thread.run_sync(bus.report_error, recorder, "job", data)
        assert event.type is EventType.SUBSCRIBER_ERROR and event.data["message"] == "disk full"
        assert (await reports.receive()).seq == event.seq
        assert handle.subscription.statistics().errors == 1


async def test_counters_of_ended_subscriptions_never_fall_back() -> None:
    """Per-job subscribers come and go; their counters stay in statistics (summed per name
    under ``retired``), so a Prometheus counter built on them never decreases."""
    async with EventBus() as bus:
        for job in ("job-1", "job-2"):
            failing = Exploding()
            failing.job_id = job
            handle = bus.attach(failing)
            last = bus.publish(job, BATCH_END, {"step": 1})
            assert await anyio.to_thread.run_sync(bus.wait_processed, last, 10)
            await handle.detach()
        plain = bus.subscribe("plain", job_id="job-1")
        bus.publish("job-1", BATCH_END, {"step": 2})
        assert (await plain.receive()).data == {"step": 2}
        plain.close()
        statistics = bus.statistics()
    live = {s.name for s in statistics.subscriptions}
    retired = {s.name: s for s in statistics.retired}
    assert "exploding" not in live and "plain" not in live
    assert retired["exploding"].errors == 2 and retired["exploding"].delivered == 2
    assert retired["plain"].delivered == 1


async def test_sequence_restored_from_a_store_continues_without_reuse() -> None:
    async with EventBus() as bus:
        bus.restore_sequence("job", 41)
        assert bus.publish("job", BATCH_END).seq == 42
        with pytest.raises(BusError):
            bus.restore_sequence("job", 10)
        bus.forget("job")
        assert bus.last_seq("job") == 0


async def test_statistics_count_published_events_by_type() -> None:
    async with EventBus() as bus:
        bus.subscribe("lossy", policy=DeliveryPolicy.DROP_OLDEST, buffer_size=2)
        for _ in range(5):
            bus.publish("job", BATCH_END)
        bus.publish("job", EventType.TRAIN_END)
        statistics = bus.statistics()
    assert statistics.published == 6
    assert statistics.published_by_type == {"train_batch_end": 5, "train_end": 1}
    (lossy,) = statistics.subscriptions
    assert (lossy.buffered, lossy.dropped) == (2, 4)
