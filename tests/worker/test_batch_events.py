"""Batch events are buffered on the training thread and published in bulk: in order, with
the times they happened, promptly for slow steps, and before anything the trainer publishes
after them."""

from __future__ import annotations

import time
from pathlib import Path

import anyio

from trainbus.bus import Event, EventBus, EventType, Subscription, WouldBlock
from trainbus.sdk import BatchEventBuffer
from trainbus.worker import Outcome, Trainer

from .conftest import small_spec
from .test_trainer import make_trainer

BATCH = [
    EventType.TRAIN_BATCH_START,
    EventType.OPTIMIZER_STEP,
    EventType.BEFORE_ZERO_GRAD,
    EventType.TRAIN_BATCH_END,
]


def received(subscription: Subscription) -> list[Event]:
    try:
        return subscription.receive_batch_nowait()
    except WouldBlock:
        return []


async def test_records_become_the_batch_vocabulary_in_order_with_their_own_times(
    bus: EventBus,
) -> None:
    subscription = bus.subscribe("all", buffer_size=10_000)
    buffer = BatchEventBuffer(bus, "job", flush_seconds=3600, max_records=1000)
    buffer.flush()  # nothing recorded: nothing published
    first_started = time.time()
    buffer.train_batch(first_started, 0, 0, 1, 0.5, 0.1, 16)  # the first goes out at once
    events = received(subscription)
    assert len(events) == 4
    buffer.train_batch(time.time(), 0, 1, 2, 0.4, 0.1, 16)
    buffer.val_batch(time.time(), 0, 0, 0.3)
    assert received(subscription) == []  # within flush_seconds: still buffered
    assert len(buffer) == 2
    buffer.flush()
    events += received(subscription)
    assert [e.type for e in events] == [
        *BATCH,
        *BATCH,
        EventType.VAL_BATCH_START,
        EventType.VAL_BATCH_END,
    ]
    assert [e.seq for e in events] == list(range(1, 11))
    assert events[0].data == {"epoch": 0, "batch": 0, "step": 0}
    assert events[0].time == first_started
    assert events[1].data == events[2].data == {"epoch": 0, "step": 1}
    assert events[3].data == {
        "epoch": 0,
        "batch": 0,
        "step": 1,
        "loss": 0.5,
        "lr": 0.1,
        "batch_size": 16,
    }
    assert events[3].time >= events[0].time
    assert events[4].time >= events[3].time
    assert events[9].data == {"epoch": 0, "batch": 0, "loss": 0.3}
    assert len(buffer) == 0


async def test_a_full_buffer_or_a_slow_step_publishes_at_once(bus: EventBus) -> None:
    subscription = bus.subscribe("all", buffer_size=10_000)
    full = BatchEventBuffer(bus, "full", flush_seconds=3600, max_records=2)
    full.train_batch(time.time(), 0, 0, 1, 0.5, 0.1, 16)
    assert len(received(subscription)) == 4
    full.train_batch(time.time(), 0, 1, 2, 0.5, 0.1, 16)
    assert received(subscription) == []
    full.train_batch(time.time(), 0, 2, 3, 0.5, 0.1, 16)
    assert len(received(subscription)) == 8
    slow = BatchEventBuffer(bus, "slow", flush_seconds=0.02)
    for batch in range(3):
        started = time.time()
        await anyio.sleep(0.03)  # a step longer than flush_seconds
        slow.train_batch(started, 0, batch, batch + 1, 0.5, 0.1, 16)
        published = received(subscription)
        assert [e.type for e in published] == BATCH, batch
        assert published[-1].data["batch"] == batch


async def test_a_command_comes_after_the_batches_before_it(bus: EventBus, data_dir: Path) -> None:
    subscription = bus.subscribe("all", buffer_size=100_000)
    trainer = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, small_spec(epochs=1))

    def save_after_step_five(trainer: Trainer) -> None:
        if trainer.step == 5:
            trainer.control.save("mid-epoch")

    trainer.add_callback("on_train_batch_end", save_after_step_five)
    assert (await anyio.to_thread.run_sync(trainer.run)).outcome is Outcome.COMPLETED
    events = received(subscription)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    saved = next(
        i
        for i, e in enumerate(events)
        if e.type is EventType.MODEL_SAVE and e.data.get("save_reason") == "command"
    )
    before = [e for e in events[:saved] if e.type is EventType.TRAIN_BATCH_END]
    after = [e for e in events[saved:] if e.type is EventType.TRAIN_BATCH_START]
    assert [e.data["step"] for e in before] == [1, 2, 3, 4, 5]
    assert after[0].data["step"] == 5  # the next batch starts from step 5
    times = [e.time for e in events]
    assert times == sorted(times)  # one thread published them all, in the order they happened
