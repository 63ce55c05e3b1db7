"""Prometheus metrics of the API itself: live WebSocket streaming and connections closed by
their bounds (read at scrape time)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ._connections import ConnectionGuard
from ._hub import EventHub

__all__ = ["ConnectionCollector", "HubCollector"]


class ConnectionCollector(Collector):
    """Exports the :class:`ConnectionGuard`'s counters."""

    def __init__(self, guard: ConnectionGuard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "trainbus_connections_refused",
            "Connections closed at accept: they would have used the file descriptors kept for "
            "the server's own files",
            value=self.guard.refused,
        )
        yield CounterMetricFamily(
            "trainbus_connections_timed_out",
            "Connections closed for sending no complete request within TRAINBUS_REQUEST_TIMEOUT",
            value=self.guard.timed_out,
        )


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
