"""Property: whatever is published and however fast subscribers read, lossless subscribers
see exactly the published events that pass their filters, in order per job; lossy ones see
an ordered subsequence of those whose holes are all announced by gap events that count
exactly the missed events of their own types."""

from __future__ import annotations

import anyio
import anyio.lowlevel
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from trainbus.bus import DeliveryPolicy, Event, EventBus, EventType, _log

TYPES = [EventType.TRAIN_BATCH_END, EventType.FIT_EPOCH_END, EventType.VAL_END]
jobs = st.sampled_from(["a", "b", "c"])
types = st.sampled_from(TYPES)
publishes = st.lists(st.tuples(jobs, types), min_size=1, max_size=120)
type_filters = st.none() | st.frozensets(types, min_size=1, max_size=2)
Spec = tuple[DeliveryPolicy, int, int, int, frozenset[EventType] | None, str | None]
subscriber_specs = st.lists(
    st.tuples(
        st.sampled_from(list(DeliveryPolicy)),
        st.integers(min_value=1, max_value=8),  # buffer size
        st.integers(min_value=1, max_value=5),  # max batch
        # yields per batch; -1: a lossy one reads only once everything is published
        st.integers(min_value=-1, max_value=3),
        type_filters,
        st.none() | jobs,  # job filter
    ),
    min_size=1,
    max_size=4,
)


async def run_scenario(
    events: list[tuple[str, EventType]], specs: list[Spec]
) -> tuple[list[Event], list[list[Event]]]:
    published: list[Event] = []
    seen: list[list[Event]] = [[] for _ in specs]
    async with EventBus() as bus:
        subscriptions = [
            bus.subscribe(
                f"s{i}", policy=policy, buffer_size=size, types=type_filter, job_id=job_filter
            )
            for i, (policy, size, _, _, type_filter, job_filter) in enumerate(specs)
        ]

        published_all = anyio.Event()

        async def consume(index: int) -> None:
            policy, _, max_batch, slowness, _, _ = specs[index]
            if slowness < 0 and policy.is_lossy:
                await published_all.wait()
            while True:
                try:
                    batch = await subscriptions[index].receive_batch(max_batch)
                except anyio.EndOfStream:
                    return
                assert 1 <= len(batch) <= max_batch
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
            published_all.set()
            await bus.aclose()
    return published, seen


def check_lossy(job_id: str, own: list[Event], received: list[Event]) -> None:
    """``received`` (one job's) is ``own`` in order, each hole announced by one gap that
    names the first and last missed event of ``own`` and counts them."""
    position = 0
    for event in received:
        if event.type is EventType.GAP:
            missed = event.data["missed"]
            assert missed >= 1
            lost = own[position : position + missed]
            assert len(lost) == missed, f"{job_id}: a gap counts events that were not missed"
            assert (event.data["from_seq"], event.data["to_seq"]) == (lost[0].seq, lost[-1].seq)
            assert event.seq == lost[-1].seq
            position += missed
        else:
            assert position < len(own) and event == own[position], "a hole without a gap"
            position += 1
    assert position == len(own), f"{job_id}: the last events were neither read nor announced"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@example(  # an idle filtering lossy reader behind a log trimmed every few events
    events=[("a", TYPES[i % 3]) for i in range(60)],
    specs=[
        (DeliveryPolicy.DROP_OLDEST, 3, 2, -1, frozenset({TYPES[1]}), None),
        (DeliveryPolicy.LATEST, 4, 5, -1, frozenset(TYPES[1:]), None),
        (DeliveryPolicy.LOSSLESS, 2, 1, 0, frozenset({TYPES[2]}), "a"),
    ],
    trim_slack=1,
)
@given(events=publishes, specs=subscriber_specs, trim_slack=st.sampled_from([1, 2, 4, 1024]))
def test_lossless_is_exact_and_lossy_holes_are_announced(
    events: list[tuple[str, EventType]], specs: list[Spec], trim_slack: int
) -> None:
    # A small slack trims the log every few events, as a long run does every thousand.
    default_slack, _log._TRIM_SLACK = _log._TRIM_SLACK, trim_slack
    try:
        published, seen = anyio.run(run_scenario, events, specs)
    finally:
        _log._TRIM_SLACK = default_slack
    for (policy, _, _, _, type_filter, job_filter), received in zip(specs, seen, strict=True):
        for job_id in {j for j, _ in events}:  # ordering is per job
            own = [
                e
                for e in published
                if e.job_id == job_id
                and (job_filter is None or job_filter == job_id)
                and (type_filter is None or e.type in type_filter)
            ]
            mine = [e for e in received if e.job_id == job_id]
            if policy is DeliveryPolicy.LOSSLESS:
                assert mine == own
            else:
                check_lossy(job_id, own, mine)
