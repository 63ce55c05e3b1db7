"""Statistics of subscriptions that ended: counted on until final, then summed per name."""

from __future__ import annotations

import threading
from dataclasses import replace

from ._delivery import SubscriptionStatistics
from ._subscription import Subscription

__all__ = ["EndedSubscriptions"]


class EndedSubscriptions:
    """Subscriptions that ended count on in statistics until their counters are final, then
    fold into per-name totals: a per-job subscriber's counters never fall back."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock
        self._ended: list[Subscription] = []
        self._retired: dict[str, SubscriptionStatistics] = {}

    def add(self, subscription: Subscription) -> None:
        """With the lock held: ``subscription`` ended (it may still be drained)."""
        self._ended.append(subscription)

    def statistics(
        self,
    ) -> tuple[tuple[SubscriptionStatistics, ...], tuple[SubscriptionStatistics, ...]]:
        """Without the lock: (those still counting, the per-name totals of the finished)."""
        with self._lock:
            ended = list(self._ended)
        still_counting: list[SubscriptionStatistics] = []
        for subscription in ended:
            done = subscription.finished  # first: statistics taken after it are final
            snapshot = subscription.statistics()
            if not done:
                still_counting.append(snapshot)
                continue
            with self._lock:
                self._ended.remove(subscription)
            self._retired[snapshot.name] = _summed(self._retired.get(snapshot.name), snapshot)
        return tuple(still_counting), tuple(self._retired.values())


def _summed(
    total: SubscriptionStatistics | None, ended: SubscriptionStatistics
) -> SubscriptionStatistics:
    """``ended``'s final counters added to ``total`` (nothing stays buffered in either)."""
    if total is None:
        return replace(ended, buffered=0)
    return replace(
        total,
        delivered=total.delivered + ended.delivered,
        dropped=total.dropped + ended.dropped,
        gaps=total.gaps + ended.gaps,
        errors=total.errors + ended.errors,
        publisher_wait_seconds=total.publisher_wait_seconds + ended.publisher_wait_seconds,
    )
