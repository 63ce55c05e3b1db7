"""Delivery policies and the statistics each subscription keeps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BusStatistics", "DeliveryPolicy", "SubscriptionStatistics"]


class DeliveryPolicy(StrEnum):
    """What happens when a subscriber's buffer is full.

    ``LOSSLESS``: nothing is dropped; the publisher waits for room (the wait is counted).
    ``DROP_OLDEST``: the oldest buffered event is dropped to make room.
    ``LATEST``: the whole buffer is dropped and only the newest event is kept.

    Lossy policies never drop silently: the subscriber receives a ``gap`` event naming the
    missed ``seq`` range before the next event of that job.
    """

    LOSSLESS = "lossless"
    DROP_OLDEST = "drop_oldest"
    LATEST = "latest"

    @property
    def is_lossy(self) -> bool:
        return self is not DeliveryPolicy.LOSSLESS


@dataclass(frozen=True, slots=True)
class SubscriptionStatistics:
    """A snapshot of one subscription's counters.

    ``delivered`` counts events handed to the consumer (``gap`` notices excluded);
    ``errors`` counts handler exceptions of an attached :class:`~bus.Subscriber`;
    ``publisher_wait_seconds`` is the time publishers spent waiting for room in this buffer.
    """

    name: str
    policy: DeliveryPolicy
    buffer_size: int
    buffered: int
    delivered: int
    dropped: int
    gaps: int
    errors: int
    publisher_wait_seconds: float


@dataclass(frozen=True, slots=True)
class BusStatistics:
    """A snapshot of the bus: events published (in all and by type), every subscription, and
    the summed counters of subscriptions that ended."""

    published: int
    published_by_type: Mapping[str, int]
    subscriptions: tuple[SubscriptionStatistics, ...]
    closed: bool
    retired: tuple[SubscriptionStatistics, ...] = ()
    """Subscriptions that have ended, one entry per name with their counters summed."""
