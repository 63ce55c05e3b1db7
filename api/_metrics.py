"""Prometheus metrics of the API itself: live WebSocket streaming (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._hub import EventHub

__all__ = ["HubCollector"]


class HubCollector(Collector):
    """Exports the hub's statistics; registered on the exporter's registry."""

    def __init__(self, hub: EventHub) -> None:
        self.hub = hub

    def collect(self) -> Iterator[Metric]:
        stats = self.hub.statistics()
        yield GaugeMetricFamily(
            "trainbus_websocket_clients", "WebSocket clients streaming events", value=stats.clients
        )
        yield CounterMetricFamily(
            "trainbus_websocket_events",
            "Events fanned out to WebSocket clients (each encoded once)",
            value=stats.events,
        )
        yield CounterMetricFamily(
            "trainbus_websocket_dropped_events",
            "Events dropped from slow WebSocket clients' buffers (refilled from the store "
            "where possible, else reported as gaps)",
            value=stats.dropped,
        )
        yield CounterMetricFamily(
            "trainbus_websocket_hub_missed_events",
            "Events the fan-out itself missed because its bus buffer overflowed",
            value=stats.hub_missed,
        )
        yield CounterMetricFamily(
            "trainbus_websocket_slow_clients_closed",
            "WebSocket clients closed with code 4008 for falling too far behind",
            value=stats.too_slow,
        )
