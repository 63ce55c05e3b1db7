"""Bus metrics for the Prometheus exporter, read from ``bus.statistics()`` at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from trainbus.bus import EventBus

__all__ = ["collect_bus"]


def collect_bus(bus: EventBus) -> Iterator[Metric]:
    """Events published by type, and per subscriber name: buffered, delivered, dropped,
    errors and publisher wait (subscriptions that share a name are summed)."""
    statistics = bus.statistics()
    published = CounterMetricFamily(
        "trainbus_events_published", "Events published on the bus, by type.", labels=["type"]
    )
    for kind, count in sorted(statistics.published_by_type.items()):
        published.add_metric([kind], count)
    yield published
    totals: dict[str, list[float]] = {}
    for sub in (*statistics.subscriptions, *statistics.retired):  # counters never fall back
        row = totals.setdefault(sub.name, [0.0] * 5)
        row[0] += sub.buffered
        row[1] += sub.delivered
        row[2] += sub.dropped
        row[3] += sub.errors
        row[4] += sub.publisher_wait_seconds
    families: list[Metric] = [
        GaugeMetricFamily(
            "trainbus_subscriber_buffered_events",
            "Events waiting in the subscriber's buffer.",
            labels=["subscriber"],
        ),
        CounterMetricFamily(
            "trainbus_subscriber_delivered_events",
            "Events handed to the subscriber.",
            labels=["subscriber"],
        ),
        CounterMetricFamily(
            "trainbus_subscriber_dropped_events",
            "Events a lossy subscriber missed.",
            labels=["subscriber"],
        ),
        CounterMetricFamily(
            "trainbus_subscriber_errors",
            "Exceptions raised by the subscriber's handlers.",
            labels=["subscriber"],
        ),
        CounterMetricFamily(
            "trainbus_subscriber_publisher_wait_seconds",
            "Time publishers waited for room in the subscriber's buffer.",
            labels=["subscriber"],
        ),
    ]
    for name, row in sorted(totals.items()):
        for family, value in zip(families, row, strict=True):
            family.add_metric([name], value)  # type: ignore[attr-defined]
    yield from families
