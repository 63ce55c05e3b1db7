"""The Prometheus exporter: names, values, retention, bus statistics, promtool."""

from __future__ import annotations

import math
import shutil
from typing import Any, cast

import anyio
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from trainbus.bus import Event, EventBus, EventType, Subscriber
from trainbus.subscribers import PrometheusExporter


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _events(job_id: str) -> list[Event]:
    rows: list[tuple[EventType, dict[str, Any]]] = [
        (EventType.JOB_QUEUED, {}),
        (EventType.JOB_STARTED, {}),
        (EventType.TRAIN_EPOCH_START, {"epoch": 0}),
        (EventType.TRAIN_BATCH_END, {"epoch": 0, "step": 1, "loss": 0.9, "batch_size": 32}),
        (EventType.TRAIN_BATCH_END, {"epoch": 0, "step": 2, "loss": 0.8, "batch_size": 32}),
        (EventType.TRAIN_BATCH_END, {"epoch": 0, "step": 4, "metrics": {"loss": 0.7}}),
        (
            EventType.FIT_EPOCH_END,
            {
                "epoch": 0,
                "step": 4,
                "metrics": {"train_loss": 0.75, "val_loss": 0.6, "val_accuracy": 0.8, "lr": 0.01},
            },
        ),
        (EventType.CHECKPOINT_SAVED, {"name": "e0", "bytes": 12345, "seconds": 0.2}),
        (EventType.LR_CHANGED, {"value": 0.001, "step": 4}),
    ]
    return [
        Event(job_id, i + 1, kind, 100.0 + i * 0.5, data) for i, (kind, data) in enumerate(rows)
    ]


def _families(exporter: PrometheusExporter) -> dict[str, Any]:
    text = exporter.render().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def _value(families: dict[str, Any], family: str, sample: str, **labels: str) -> float:
    for item in families[family].samples:
        if item.name == sample and all(item.labels.get(k) == v for k, v in labels.items()):
            return float(item.value)
    raise AssertionError(f"no {sample} {labels}")


def test_job_metrics_from_events() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    exporter.observe(_events("a"))
    families = _families(exporter)
    assert _value(families, "trainbus_jobs", "trainbus_jobs", state="running") == 1
    assert _value(families, "trainbus_jobs", "trainbus_jobs", state="failed") == 0
    assert _value(families, "trainbus_job_epoch", "trainbus_job_epoch", job_id="a") == 0
    assert _value(families, "trainbus_job_step", "trainbus_job_step", job_id="a") == 4
    assert (
        _value(families, "trainbus_job_train_loss", "trainbus_job_train_loss", job_id="a") == 0.75
    )
    assert (
        _value(families, "trainbus_job_learning_rate", "trainbus_job_learning_rate", job_id="a")
        == 0.001
    )
    assert (
        _value(
            families,
            "trainbus_job_validation_metric",
            "trainbus_job_validation_metric",
            job_id="a",
            metric="val_accuracy",
        )
        == 0.8
    )
    assert _value(families, "trainbus_job_samples", "trainbus_job_samples_total", job_id="a") == 64
    histogram = "trainbus_job_step_duration_seconds"
    # 0.5 s between steps 1 and 2, 0.5 s for steps 2..4: 0.25 s each
    assert _value(families, histogram, histogram + "_count", job_id="a") == 2
    assert _value(families, histogram, histogram + "_sum", job_id="a") == pytest.approx(0.75)
    assert _value(families, histogram, histogram + "_bucket", job_id="a", le="0.25") == 1
    assert (
        _value(families, "trainbus_checkpoint_bytes", "trainbus_checkpoint_bytes", job_id="a")
        == 12345
    )
    assert (
        _value(
            families, "trainbus_checkpoint_write_seconds", "trainbus_checkpoint_write_seconds_count"
        )
        == 1
    )


def test_ended_jobs_are_removed_after_the_retention() -> None:
    clock = _Clock()
    exporter = PrometheusExporter(retention_seconds=60.0, process_metrics=False, clock=clock)
    exporter.observe(_events("a"))
    exporter.observe(_events("b"))
    exporter.observe([Event("a", 20, EventType.JOB_COMPLETED, 200.0, {})])
    clock.now += 59
    families = _families(exporter)
    assert _value(families, "trainbus_job_step", "trainbus_job_step", job_id="a") == 4
    clock.now += 1
    families = _families(exporter)
    job_ids = {s.labels.get("job_id") for f in families.values() for s in f.samples}
    assert "a" not in job_ids and "b" in job_ids
    assert _value(families, "trainbus_jobs", "trainbus_jobs", state="completed") == 1
    assert _value(families, "trainbus_jobs", "trainbus_jobs", state="running") == 1


def test_gpu_metrics_from_resource_samples() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    gpu = {
        "index": 0,
        "name": "H100",
        "utilization_ratio": 0.9,
        "memory_used_bytes": 2**30,
        "memory_total_bytes": 2**34,
        "temperature_celsius": 61.0,
        "power_watts": None,
    }
    exporter.observe(
        [
            Event(
                "_server",
                1,
                EventType.RESOURCE_SAMPLE,
                1.0,
                {"system_cpu_percent": 50.0, "gpus": [gpu]},
            )
        ]
    )
    families = _families(exporter)
    assert (
        _value(
            families,
            "trainbus_gpu_utilization_ratio",
            "trainbus_gpu_utilization_ratio",
            gpu="0",
            name="H100",
        )
        == 0.9
    )
    assert (
        _value(
            families, "trainbus_gpu_memory_total_bytes", "trainbus_gpu_memory_total_bytes", gpu="0"
        )
        == 2**34
    )
    assert families["trainbus_gpu_power_watts"].samples == []
    assert (
        _value(
            families, "trainbus_host_cpu_utilization_ratio", "trainbus_host_cpu_utilization_ratio"
        )
        == 0.5
    )
    assert "_server" not in {s.labels.get("job_id") for f in families.values() for s in f.samples}


class _Failing(Subscriber):
    async def on_train_batch_end(self, event: Event) -> None:
        raise RuntimeError("boom")


async def test_bus_statistics_and_promtool() -> None:
    async with EventBus() as bus:
        exporter = PrometheusExporter(bus=bus, process_metrics=True)
        handles = [bus.attach(exporter), bus.attach(_Failing())]
        for event in _events("a"):
            last = await bus.publish_async(event.job_id, event.type, event.data)
        assert await anyio.to_thread.run_sync(bus.wait_processed, last, 5.0)
        text = exporter.render()
        for handle in handles:
            await handle.detach()
    families = {f.name: f for f in text_string_to_metric_families(text.decode())}
    assert (
        _value(
            families,
            "trainbus_events_published",
            "trainbus_events_published_total",
            type="train_batch_end",
        )
        == 3
    )
    assert (
        _value(
            families,
            "trainbus_subscriber_errors",
            "trainbus_subscriber_errors_total",
            subscriber="__failing",
        )
        == 3
    )
    assert (
        _value(
            families,
            "trainbus_subscriber_delivered_events",
            "trainbus_subscriber_delivered_events_total",
            subscriber="__failing",  # lossless: wait_processed covered it
        )
        == 3
    )
    assert "process_resident_memory_bytes" in families
    assert exporter.content_type.startswith("text/plain")
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is missing: apt-get install prometheus (make system-deps)")
    with anyio.fail_after(60):
        result = await anyio.run_process([promtool, "check", "metrics"], input=text, check=False)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b""


def test_samples_from_epoch_totals_when_batches_carry_none() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    exporter.observe(
        [
            Event("w", 1, EventType.TRAIN_BATCH_END, 1.0, {"step": 1, "loss": 0.5, "lr": 0.1}),
            Event(
                "w",
                2,
                EventType.TRAIN_EPOCH_END,
                2.0,
                {"epoch": 0, "metrics": {"samples_per_s": 100.0, "epoch_seconds": 2.5}},
            ),
        ]
    )
    families = _families(exporter)
    assert _value(families, "trainbus_job_samples", "trainbus_job_samples_total", job_id="w") == 250
    assert (
        _value(families, "trainbus_job_learning_rate", "trainbus_job_learning_rate", job_id="w")
        == 0.1
    )


# Whatever event data may hold, odd values included: a huge int makes float() raise half-way.
_values = st.one_of(
    st.none(),
    st.integers(min_value=-3, max_value=40),
    st.floats(),
    st.booleans(),
    st.sampled_from([-0.0, "0.5", [1.0], {"loss": 1.0}, 10**400]),
)
_metrics = st.one_of(
    _values,
    st.fixed_dictionaries(
        {},
        optional={
            key: _values
            for key in (
                "loss",
                "train_loss",
                "lr",
                "val_accuracy",
                "samples_per_s",
                "epoch_seconds",
            )
        },
    ),
)
_data = st.fixed_dictionaries(
    {},
    optional={
        "epoch": _values,
        "step": _values,
        "loss": _values,
        "metrics": _metrics,
        "samples": _values,
        "batch_size": _values,
        "lr": _values,
        "step_seconds": _values,
        "value": _values,
        "seconds": _values,
        "bytes": _values,
    },
)
_kinds = st.one_of(  # train_batch_end two times in three
    st.just(EventType.TRAIN_BATCH_END),
    st.just(EventType.TRAIN_BATCH_END),
    st.sampled_from(
        [
            EventType.TRAIN_BATCH_START,
            EventType.TRAIN_EPOCH_START,
            EventType.TRAIN_EPOCH_END,
            EventType.FIT_EPOCH_END,
            EventType.JOB_STARTED,
            EventType.JOB_COMPLETED,
            EventType.LR_CHANGED,
            EventType.CHECKPOINT_SAVED,
            EventType.GAP,
            # equal to TRAIN_BATCH_END (a StrEnum) but not read as one
            cast(EventType, "train_batch_end"),
        ]
    ),
)
# Runs of one job and type, as the trainer publishes them; neighbours may extend a run.
_segments = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]),
        _kinds,
        st.lists(
            st.tuples(st.one_of(st.floats(0.0, 100.0), st.just(math.nan)), _data),
            min_size=1,
            max_size=8,
        ),
    ),
    max_size=4,
)
_Segments = list[tuple[str, EventType, list[tuple[float, dict[str, Any]]]]]


def _exported(calls: list[_Segments], *, one_at_a_time: bool) -> list[tuple[bytes, str | None]]:
    """The metrics after each ``observe()`` call, and what it raised."""
    exporter = PrometheusExporter(process_metrics=False, clock=lambda: 1000.0)
    results = []
    seq = 0
    for segments in calls:
        events = []
        for job_id, kind, run in segments:
            for time, data in run:
                seq += 1
                events.append(Event(job_id, seq, kind, time, data))
        error = None
        try:
            if one_at_a_time:
                for event in events:
                    exporter.observe([event])
            else:
                exporter.observe(events)
        except Exception as raised:  # both ways stop at the event that raised
            error = repr(raised)
        results.append((exporter.render(), error))
    # What render() does not show but later events read: the last batch (a step duration
    # from it) and whether samples are counted from batches (else from the epoch totals).
    for job_id in ("a", "b"):
        exporter.observe([Event(job_id, 0, EventType.TRAIN_BATCH_END, 500.0, {"step": 1000})])
        exporter.observe(
            [
                Event(
                    job_id,
                    0,
                    EventType.TRAIN_EPOCH_END,
                    501.0,
                    {"metrics": {"samples_per_s": 3.0, "epoch_seconds": 2.0}},
                )
            ]
        )
    results.append((exporter.render(), None))
    return results


_BATCH_END = EventType.TRAIN_BATCH_END


@settings(max_examples=200, deadline=None)
@given(calls=st.lists(_segments, min_size=1, max_size=5))
# max(0.0, -0.0) is 0.0
@example(calls=[[("a", _BATCH_END, [(1.0, {}), (2.0, {"samples": -0.0})])]])
# the step raises before the epoch is set
@example(calls=[[("a", _BATCH_END, [(1.0, {}), (2.0, {"epoch": 1, "step": 10**400})])]])
def test_runs_of_batch_ends_give_what_one_event_at_a_time_gives(calls: list[_Segments]) -> None:
    assert _exported(calls, one_at_a_time=False) == _exported(calls, one_at_a_time=True)
