"""Metric series for charts: a job's values of one metric, downsampled to a requested size.

A long job has hundreds of thousands of batch events; a chart a few hundred pixels wide needs
a few thousand points. Each bucket of consecutive points keeps its minimum and its maximum (in
the order they occurred), so spikes survive the downsampling where an average would hide them.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from trainbus.bus import Event, EventType

__all__ = [
    "BATCH_METRICS",
    "RESOURCE_METRICS",
    "Series",
    "SeriesCache",
    "downsample_min_max",
    "extract",
    "source_types",
]

BATCH_METRICS = frozenset({"loss", "lr"})
"""Metrics read from every ``train_batch_end`` event (x is the optimizer step)."""
RESOURCE_METRICS = frozenset({"process_cpu_percent", "system_cpu_percent", "rss_bytes"})
"""Metrics read from ``resource_sample`` events (x is the time, in seconds since the epoch)."""
_GPU_METRIC = re.compile(r"^gpu(\d{1,3})\.([a-z_]{1,40})$")
"""A GPU's figure in ``resource_sample`` events: ``gpu0.utilization_ratio``,
``gpu1.memory_used_bytes``, ... (x is the time)."""
_EPOCH_TYPES = (EventType.TRAIN_EPOCH_END, EventType.FIT_EPOCH_END)


@dataclass
class Series:
    """One metric's points: ``x`` (step, or time for resources), ``y``, and the epoch of each
    point (``None`` for resources)."""

    x: list[float]
    y: list[float]
    epoch: list[float | None]

    def to_dict(self) -> dict[str, Any]:
        return {"x": self.x, "y": self.y, "epoch": self.epoch}


def source_types(metric: str) -> frozenset[EventType]:
    """The event types that carry ``metric``."""
    if metric in BATCH_METRICS:
        return frozenset({EventType.TRAIN_BATCH_END})
    if metric in RESOURCE_METRICS or _GPU_METRIC.match(metric):
        return frozenset({EventType.RESOURCE_SAMPLE})
    return frozenset(_EPOCH_TYPES)


def _gpu_value(data: Mapping[str, Any], index: int, field: str) -> Any:
    gpus = data.get("gpus")
    if not isinstance(gpus, list):
        return None
    for gpu in gpus:
        if isinstance(gpu, dict) and gpu.get("index") == index:
            return gpu.get(field)
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def extract(metric: str, events: Iterable[Event]) -> Series:
    """The points of ``metric`` in ``events`` (non-finite and missing values are skipped)."""
    series = Series([], [], [])
    gpu = _GPU_METRIC.match(metric)
    if gpu is not None:
        index, field = int(gpu.group(1)), gpu.group(2)
        for event in events:
            value = _number(_gpu_value(event.data, index, field))
            if value is not None:
                series.x.append(event.time)
                series.y.append(value)
                series.epoch.append(None)
    elif metric in BATCH_METRICS:
        for event in events:
            data = event.data
            value = _number(data.get(metric))
            if value is not None:
                series.x.append(float(data.get("step", event.seq)))
                series.y.append(value)
                series.epoch.append(_number(data.get("epoch")))
    elif metric in RESOURCE_METRICS:
        for event in events:
            value = _number(event.data.get(metric))
            if value is not None:
                series.x.append(event.time)
                series.y.append(value)
                series.epoch.append(None)
    else:
        for event in events:
            data = event.data
            metrics = data.get("metrics")
            value = _number(metrics.get(metric)) if isinstance(metrics, dict) else None
            if value is not None:
                series.x.append(float(data.get("step", event.seq)))
                series.y.append(value)
                epoch = _number(data.get("epoch"))
                # an epoch's metrics describe the end of that epoch: plot at epoch + 1
                series.epoch.append(None if epoch is None else epoch + 1)
    return series


def _bucket_indices(y: Sequence[float], start: int, stop: int) -> list[int]:
    """The indices of the minimum and maximum of ``y[start:stop]``, in order of occurrence."""
    low = high = start
    for index in range(start + 1, stop):
        value = y[index]
        if value < y[low]:
            low = index
        elif value > y[high]:
            high = index
    return [low] if low == high else sorted((low, high))


def downsample_min_max(series: Series, points: int) -> Series:
    """At most ``points`` points of ``series``: the minimum and maximum of each of
    ``points // 2`` equal buckets (the first and last points are always kept).

    :raises ValueError: for ``points`` < 4.
    """
    if points < 4:
        raise ValueError(f"points must be at least 4, got {points}")
    count = len(series.y)
    if count <= points:
        return series
    inner = count - 2
    buckets = (points - 2) // 2
    kept = [0]
    for bucket in range(buckets):
        start = 1 + bucket * inner // buckets
        stop = 1 + (bucket + 1) * inner // buckets
        if start < stop:
            kept.extend(_bucket_indices(series.y, start, stop))
    kept.append(count - 1)
    return Series(
        [series.x[i] for i in kept], [series.y[i] for i in kept], [series.epoch[i] for i in kept]
    )


@dataclass
class _Cached:
    series: Series
    last_seq: int


class SeriesCache:
    """Full series already computed, by job and metric, extended with the events stored since.

    A job page, a reload or a comparison then reads only the events after the cached ``seq``
    instead of decoding the job's whole history again. At most ``max_entries`` series are
    kept (the least recently used go first).
    """

    def __init__(self, max_entries: int = 64) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], _Cached] = OrderedDict()

    def get(self, job_id: str, metric: str, upto: int) -> _Cached | None:
        """The cached series, unless it is ahead of ``upto`` (the job's events were deleted)."""
        cached = self._entries.get((job_id, metric))
        if cached is None or cached.last_seq > upto:
            return None
        self._entries.move_to_end((job_id, metric))
        return cached

    def extend(self, job_id: str, metric: str, events: Sequence[Event], upto: int) -> Series:
        """Add ``events`` (all after the cached ``seq``, at most ``upto``) and return the full
        series."""
        cached = self.get(job_id, metric, upto)
        if cached is None:
            cached = _Cached(Series([], [], []), 0)
        fresh = extract(metric, (event for event in events if event.seq > cached.last_seq))
        cached.series.x.extend(fresh.x)
        cached.series.y.extend(fresh.y)
        cached.series.epoch.extend(fresh.epoch)
        cached.last_seq = upto
        self._entries[(job_id, metric)] = cached
        self._entries.move_to_end((job_id, metric))
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return cached.series
