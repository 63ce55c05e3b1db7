"""Property: whatever is published and however fast subscribers read, lossless subscribers
see exactly what was published, in order per job; lossy ones see an ordered subsequence whose holes
are all announced by gap events."""

from __future__ import annotations

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bus import DeliveryPolicy, Event, EventBus, EventType

jobs = st.sampled_from(["a", "b", "c"])
types = st.sampled_from([EventType.TRAIN_BATCH_END, EventType.FIT_EPOCH_END, EventType.VAL_END])
publishes = st.lists(st.tuples(jobs, types), min_size=1, max_size=120)
subscriber_specs = st.lists(
    st.tuples(
        st.sampled_from(list(DeliveryPolicy)),
        st.integers(min_value=1, max_value=8),  # buffer size
        st.integers(min_value=1, max_value=5),  # max batch
        st.integers(min_value=0, max_value=3),  # checkpoints (yields) per batch: speed
    ),
    min_size=1,
    max_size=4,
)


async def run_scenario(
    events: list[tuple[str, EventType]], specs: list[tuple[DeliveryPolicy, int, int, int]]
) -> tuple[list[Event], list[list[Event]]]:
    published: list[Event] = []
    seen: list[list[Event]] = [[] for _ in specs]
    async with EventBus() as bus:
        subscriptions = [
            bus.subscribe(f"s{i}", policy=policy, buffer_size=size)
            for i, (policy, size, _, _) in enumerate(specs)
        ]

        async def consume(index: int) -> None:
            _, _, max_batch, slowness = specs[index]
            while True:
                try:
                    batch = await subscriptions[index].receive_batch(max_batch)
                except anyio.EndOfStream:
                    return
                seen[index].extend(batch)
                for _ in range(slowness):
                    await anyio.lowlevel.checkpoint()

        def publish_all() -> None:
            for job_id, event_type in events:
                published.append(bus.publish(job_id, event_type))

        async with anyio.create_task_group() as tg:
            for index in range(len(specs)):
                tg.start_soon(consume, index)
            await anyio.to_thread.run_sync(publish_all)
            await bus.aclose()
    return published, seen


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events=publishes, specs=subscriber_specs)
def test_lossless_is_exact_and_lossy_holes_are_announced(
    events: list[tuple[str, EventType]], specs: list[tuple[DeliveryPolicy, int, int, int]]
) -> None:
    published, seen = anyio.run(run_scenario, events, specs)
    for (policy, _, _, _), received in zip(specs, seen, strict=True):
        if policy is DeliveryPolicy.LOSSLESS:
            for job_id in {j for j, _ in events}:  # ordering is per job
                assert [e for e in received if e.job_id == job_id] == [
                    e for e in published if e.job_id == job_id
                ]
            assert len(received) == len(published)
            continue
        by_key = {(e.job_id, e.seq): e for e in published}
        real = [e for e in received if e.type is not EventType.GAP]
        assert all(by_key[(e.job_id, e.seq)] == e for e in real)
        for job_id in {j for j, _ in events}:
            expected = 1
            for event in (e for e in received if e.job_id == job_id):
                if event.type is EventType.GAP:
                    assert event.data["from_seq"] == expected
                    assert event.data["to_seq"] >= event.data["from_seq"]
                    assert event.data["missed"] == event.data["to_seq"] - expected + 1
                    expected = event.data["to_seq"] + 1
                else:
                    assert event.seq == expected, "a hole without a gap event"
                    expected += 1
            assert expected - 1 == max(e.seq for e in published if e.job_id == job_id)
