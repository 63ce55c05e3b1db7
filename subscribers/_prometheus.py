"""The Prometheus exporter: job, bus, checkpoint, GPU and process metrics from the events."""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, groupby
from operator import attrgetter
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from trainbus.bus import (
    BATCH_EVENT_TYPES,
    ENDED_STATES,
    DeliveryPolicy,
    Event,
    EventBus,
    EventType,
    JobState,
    Subscriber,
)

from ._prometheus_bus import collect_bus

__all__ = ["PrometheusExporter"]

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CHECKPOINT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STATE_OF_EVENT: dict[EventType, str] = {
    **{state.event_type: state.value for state in JobState},
    EventType.JOB_RESUMED: JobState.RUNNING.value,
}
# Runs of events of one job and type; with the type's class, as a str equal to an EventType
# (StrEnum) is not one for ``_observe``.
_JOB_AND_TYPE = attrgetter("job_id", "type", "type.__class__")


class _Histogram:
    """Bucket counts of one histogram (cumulated when exported)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        result, total = [], 0
        for bound, count in zip([*map(_float_text, self.bounds), "+Inf"], self.counts, strict=True):
            total += count
            result.append((bound, float(total)))
        return result


def _float_text(value: float) -> str:
    return repr(float(value))


@dataclass
class _Job:
    state: str | None = None
    ended_at: float | None = None
    epoch: float | None = None
    step: float | None = None
    train_loss: float | None = None
    learning_rate: float | None = None
    validation: dict[str, float] = field(default_factory=dict)
    samples: float = 0.0
    counted_batches: bool = False  # samples come from batch events, not epoch totals
    step_durations: _Histogram = field(default_factory=lambda: _Histogram(STEP_BUCKETS))
    last_batch: tuple[float, float | None] | None = None  # (time, step) of the last batch end
    checkpoint_bytes: float | None = None
    stalled: bool = False  # job_stalled came and its step has not moved since
    stalled_step: float | None = None
    stalls: int = 0


def _number(value: Any) -> float | None:
    kind = type(value)
    if kind is float:  # the common case first: this runs several times per batch event
        return value  # type: ignore[no-any-return]
    if kind is int or (isinstance(value, int | float) and not isinstance(value, bool)):
        return float(value)
    return None


class PrometheusExporter(Subscriber):
    """Turns the event stream (and the bus's statistics) into Prometheus metrics.

    One per server, attached lossy (``drop_oldest``): telemetry may miss events under load
    but never holds training back. It owns a :class:`~prometheus_client.CollectorRegistry`
    (:attr:`registry`); :meth:`render` returns the text exposition for ``/metrics``
    (:attr:`content_type` is its media type).

    Per-job series (label ``job_id``) exist while a job is known and for
    ``retention_seconds`` after it ends (``job_completed|stopped|failed|interrupted``), then
    are removed, so label cardinality stays bounded. Exported:

    - ``trainbus_jobs{state}``: jobs by state, counted from ``job_*`` events (ended jobs stay
      counted after their series are removed);
    - ``trainbus_job_epoch``, ``trainbus_job_step``, ``trainbus_job_train_loss``,
      ``trainbus_job_learning_rate``, ``trainbus_job_validation_metric{metric}``,
      ``trainbus_job_samples_total``, ``trainbus_job_step_duration_seconds`` (histogram),
      ``trainbus_checkpoint_bytes`` (size of the job's last checkpoint),
      ``trainbus_job_stalled`` (1 from ``job_stalled`` until the job's step moves, it pauses
      or it ends) and ``trainbus_job_stalls_total`` (``job_stalled`` events);
    - ``trainbus_checkpoint_write_seconds`` (histogram over all jobs);
    - from ``bus.statistics()`` at scrape time: ``trainbus_events_published_total{type}``,
      ``trainbus_subscriber_buffered_events{subscriber}``,
      ``trainbus_subscriber_delivered_events_total``, ``..._dropped_events_total``,
      ``..._errors_total``, ``..._publisher_wait_seconds_total`` (subscriptions sharing a
      name are summed);
    - from ``resource_sample`` events, per GPU (label ``gpu``, the NVML index, and ``name``),
      with the meaning of NVIDIA DCGM exporter's fields in base units:
      ``trainbus_gpu_utilization_ratio`` (DCGM_FI_DEV_GPU_UTIL / 100),
      ``trainbus_gpu_memory_used_bytes`` (DCGM_FI_DEV_FB_USED),
      ``trainbus_gpu_memory_total_bytes`` (FB_USED + FB_FREE),
      ``trainbus_gpu_temperature_celsius`` (DCGM_FI_DEV_GPU_TEMP),
      ``trainbus_gpu_power_watts`` (DCGM_FI_DEV_POWER_USAGE),
      ``trainbus_gpu_torch_allocated_bytes``, ``trainbus_gpu_torch_reserved_bytes``; and
      ``trainbus_host_cpu_utilization_ratio``;
    - from the ``workers`` of ``resource_sample`` events, per job's worker process (label
      ``job_id``; a job's series go when its worker is no longer listed):
      ``trainbus_job_cpu_seconds_total`` (user + system), ``trainbus_job_resident_memory_bytes``
      and ``trainbus_job_gpu_memory_bytes{gpu}`` (NVML's figure for the worker's pid); for a
      distributed job, each rank as well (labels ``job_id`` and ``rank``):
      ``trainbus_job_rank_cpu_seconds_total``, ``trainbus_job_rank_resident_memory_bytes`` and
      ``trainbus_job_rank_gpu_memory_bytes{gpu}``;
    - ``process_cpu_seconds_total``, ``process_resident_memory_bytes`` and the rest of
      prometheus-client's process collector.

    Of the batch events only ``train_batch_end`` is read: ``step``, ``epoch``, ``lr``, the loss
    as ``loss`` or ``metrics.loss``/``metrics.train_loss``, samples as a running
    ``samples`` count or a ``batch_size`` per batch (else ``samples_per_s * epoch_seconds``
    from ``train_epoch_end`` metrics), the step duration as ``step_seconds`` or else the
    time between two ``train_batch_end`` events divided by the steps between them (so
    thinned batch events still give per-step durations).

    :param bus: the bus whose statistics are exported (None: no bus metrics).
    :param retention_seconds: how long an ended job's series stay.
    :param process_metrics: register prometheus-client's process collector.
    :param clock: monotonic clock (seconds), replaceable in tests.
    """

    steers_training = False  # it records; training never waits for it

    policy = DeliveryPolicy.DROP_OLDEST
    buffer_size = 8192
    max_batch = 1024
    # Of the per-batch events only ``train_batch_end`` carries what is exported (the others
    # repeat its epoch and step): the bus skips them instead of handing them over.
    types = frozenset(EventType) - (BATCH_EVENT_TYPES - {EventType.TRAIN_BATCH_END})
    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self,
        *,
        bus: EventBus | None = None,
        retention_seconds: float = 3600.0,
        process_metrics: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.retention_seconds = retention_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}
        self._ended_counts = {state.value: 0 for state in JobState}  # states of pruned jobs
        self._checkpoint_seconds = _Histogram(CHECKPOINT_BUCKETS)
        self._gpus: dict[int, dict[str, Any]] = {}
        self._host_cpu: float | None = None
        self._workers: dict[str, Mapping[str, Any]] = {}
        """The latest sample of each job's worker process, by job id."""
        self.registry = CollectorRegistry()
        self.registry.register(_Collector(self))
        if process_metrics:
            ProcessCollector(namespace="", registry=self.registry)

    # -- rendering --------------------------------------------------------------------------

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format (prunes ended jobs first)."""
        self.prune()
        return generate_latest(self.registry)

    def prune(self, now: float | None = None) -> list[str]:
        """Remove the series of jobs that ended more than ``retention_seconds`` ago."""
        now = self._clock() if now is None else now
        with self._lock:
            gone = [
                job_id
                for job_id, job in self._jobs.items()
                if job.ended_at is not None and now - job.ended_at >= self.retention_seconds
            ]
            for job_id in gone:
                state = self._jobs.pop(job_id).state
                if state is not None:
                    self._ended_counts[state] += 1
        return gone

    # -- events -----------------------------------------------------------------------------

    async def on_events(self, events: Sequence[Event]) -> None:
        self.observe(events)
        self.prune()

    def observe(self, events: Iterable[Event]) -> None:
        """Update the metrics from ``events`` (what the bus handler does)."""
        with self._lock:
            for (_, kind, _), run in groupby(events, _JOB_AND_TYPE):
                if kind is EventType.TRAIN_BATCH_END:
                    self._observe_batch_ends(run)
                else:
                    for event in run:
                        self._observe(event)

    def _job(self, job_id: str) -> _Job:
        """The series of ``job_id`` (new ones for a job seen for the first time)."""
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job()
        return job

    def _observe(self, event: Event) -> None:
        kind = event.type
        data = event.data
        if kind is EventType.GAP or kind is EventType.SUBSCRIBER_ERROR:
            return
        if kind is EventType.RESOURCE_SAMPLE:
            self._observe_resources(data)
            return
        job = self._job(event.job_id)
        state = _STATE_OF_EVENT.get(kind)
        if state is not None:
            job.state = state
            job.ended_at = self._clock() if state in ENDED_STATES else None
            job.last_batch = None
        epoch, step = _number(data.get("epoch")), _number(data.get("step"))
        if kind is EventType.JOB_STALLED:
            job.stalled, job.stalled_step = True, step
            job.stalls += 1
        elif job.stalled and (state is not None or (step is not None and step != job.stalled_step)):
            job.stalled = False  # it moved on, or paused or ended
        if epoch is not None:
            job.epoch = epoch
        if step is not None:
            job.step = step
        if kind is EventType.TRAIN_EPOCH_START:
            job.last_batch = None
        elif kind is EventType.FIT_EPOCH_END:
            self._observe_metrics(job, data.get("metrics"))
        elif kind is EventType.TRAIN_EPOCH_END:
            metrics = data.get("metrics")
            self._observe_metrics(job, metrics)
            if not job.counted_batches and isinstance(metrics, Mapping):
                rate = _number(metrics.get("samples_per_s"))
                seconds = _number(metrics.get("epoch_seconds"))
                if rate is not None and seconds is not None:
                    job.samples += round(rate * seconds)
        elif kind is EventType.LR_CHANGED:
            lr = _number(data.get("value"))
            if lr is not None:
                job.learning_rate = lr
        elif kind is EventType.CHECKPOINT_SAVED:
            seconds, size = _number(data.get("seconds")), _number(data.get("bytes"))
            if seconds is not None:
                self._checkpoint_seconds.observe(seconds)
            if size is not None:
                job.checkpoint_bytes = size

    def _observe_batch_ends(self, events: Iterator[Event]) -> None:
        """A run of one job's ``train_batch_end`` events: epoch, step, loss, samples, learning
        rate and the step-duration histogram.

        The trainer publishes these by the hundred, and each microsecond spent here is taken from
        the training thread (the GIL), so the job's fields stay in locals until the run ends (less
        than half the time an event of one at a time). A run gives what its events one at a time
        give (a test checks), also when a value raises half-way: the events before it stay counted,
        as do the fields it had already set.
        """
        first = next(events)
        job = self._job(first.job_id)
        job.stalled = False  # it trains
        events = chain((first,), events)
        job_epoch, job_step, job_loss = job.epoch, job.step, job.train_loss
        job_lr, job_samples = job.learning_rate, job.samples
        counted_batches, last_batch = job.counted_batches, job.last_batch
        durations = job.step_durations
        bounds, counts, durations_sum = durations.bounds, durations.counts, durations.sum
        try:
            for event in events:
                data = event.data
                # _number() inlined for what JSON holds most (None, float, int): calling it for
                # each field took 40% of the time.
                epoch = data.get("epoch")
                if epoch is not None and type(epoch) is not float:
                    epoch = float(epoch) if type(epoch) is int else _number(epoch)
                step = data.get("step")
                if step is not None and type(step) is not float:
                    step = float(step) if type(step) is int else _number(step)
                if epoch is not None:
                    job_epoch = epoch
                if step is not None:
                    job_step = step
                loss = data.get("loss")
                if loss is not None and type(loss) is not float:
                    loss = float(loss) if type(loss) is int else _number(loss)
                if loss is None:
                    metrics = data.get("metrics")
                    if isinstance(metrics, Mapping):
                        loss = _number(metrics.get("loss", metrics.get("train_loss")))
                if loss is not None:
                    job_loss = loss
                samples = data.get("samples")
                if samples is not None and type(samples) is not float:
                    samples = float(samples) if type(samples) is int else _number(samples)
                batch_size = data.get("batch_size")
                if batch_size is not None and type(batch_size) is not float:
                    batch_size = (
                        float(batch_size) if type(batch_size) is int else _number(batch_size)
                    )
                if samples is not None:
                    if samples > job_samples:  # max(job_samples, samples), NaN included
                        job_samples = samples
                    counted_batches = True
                elif batch_size is not None:
                    job_samples += batch_size
                    counted_batches = True
                lr = data.get("lr")
                if lr is not None and type(lr) is not float:
                    lr = float(lr) if type(lr) is int else _number(lr)
                if lr is not None:
                    job_lr = lr
                duration = data.get("step_seconds")
                if duration is not None and type(duration) is not float:
                    duration = float(duration) if type(duration) is int else _number(duration)
                if duration is None and last_batch is not None:
                    last_time, last_step = last_batch
                    steps = 1.0 if step is None or last_step is None else step - last_step
                    if steps > 0:
                        duration = (event.time - last_time) / steps
                if duration is not None and duration >= 0:
                    counts[bisect_left(bounds, duration)] += 1
                    durations_sum += duration
                last_batch = (event.time, step)
        finally:
            job.epoch, job.step, job.train_loss = job_epoch, job_step, job_loss
            job.learning_rate, job.samples = job_lr, job_samples
            job.counted_batches, job.last_batch = counted_batches, last_batch
            durations.sum = durations_sum

    @staticmethod
    def _observe_metrics(job: _Job, metrics: Any) -> None:
        if not isinstance(metrics, Mapping):
            return
        for key, value in metrics.items():
            number = _number(value)
            if number is None:
                continue
            name = str(key)
            if name in ("lr", "learning_rate"):
                job.learning_rate = number
            elif name in ("train_loss", "loss"):
                job.train_loss = number
            elif name.startswith("val"):
                job.validation[name] = number

    def _observe_resources(self, data: Mapping[str, Any]) -> None:
        self._host_cpu = _number(data.get("system_cpu_percent"))
        if self._host_cpu is not None:
            self._host_cpu /= 100.0
        workers = data.get("workers")
        if isinstance(workers, list):  # every running worker: those not listed have ended
            self._workers = {
                str(worker["job_id"]): worker
                for worker in workers
                if isinstance(worker, Mapping) and worker.get("job_id") is not None
            }
        gpus = data.get("gpus")
        if isinstance(gpus, list):
            for gpu in gpus:
                if isinstance(gpu, Mapping) and isinstance(gpu.get("index"), int):
                    self._gpus[gpu["index"]] = dict(gpu)

    # -- collection -------------------------------------------------------------------------

    def _collect(self) -> Iterator[Metric]:
        with self._lock:
            yield from self._collect_jobs()
            yield from self._collect_resources()
        if self.bus is not None:
            yield from collect_bus(self.bus)

    def _collect_jobs(self) -> Iterator[Metric]:
        by_state = dict(self._ended_counts)
        for job in self._jobs.values():
            if job.state is not None:
                by_state[job.state] += 1
        jobs = GaugeMetricFamily("trainbus_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            jobs.add_metric([state], by_state[state])
        yield jobs

        def gauge(name: str, doc: str, attribute: str) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=["job_id"])
            for job_id, job in self._jobs.items():
                value = getattr(job, attribute)
                if value is not None:
                    family.add_metric([job_id], value)
            return family

        yield gauge("trainbus_job_epoch", "Current epoch of the job (0-based).", "epoch")
        yield gauge("trainbus_job_step", "Optimizer steps done by the job.", "step")
        yield gauge("trainbus_job_train_loss", "Latest training loss of the job.", "train_loss")
        yield gauge(
            "trainbus_job_learning_rate",
            "Learning rate of the job's first group.",
            "learning_rate",
        )
        yield gauge(
            "trainbus_checkpoint_bytes",
            "Size of the job's latest checkpoint.",
            "checkpoint_bytes",
        )
        stalled = GaugeMetricFamily(
            "trainbus_job_stalled",
            "1 while the job is stalled (job_stalled, and its step has not moved since), else 0.",
            labels=["job_id"],
        )
        stalls = CounterMetricFamily(
            "trainbus_job_stalls", "Times the job was reported stalled.", labels=["job_id"]
        )
        for job_id, job in self._jobs.items():
            stalled.add_metric([job_id], float(job.stalled))
            stalls.add_metric([job_id], job.stalls)
        yield stalled
        yield stalls
        validation = GaugeMetricFamily(
            "trainbus_job_validation_metric",
            "Latest validation metrics of the job.",
            labels=["job_id", "metric"],
        )
        samples = CounterMetricFamily(
            "trainbus_job_samples", "Training samples processed by the job.", labels=["job_id"]
        )
        durations = HistogramMetricFamily(
            "trainbus_job_step_duration_seconds",
            "Wall-clock duration of the job's training steps.",
            labels=["job_id"],
        )
        for job_id, job in self._jobs.items():
            for metric, value in sorted(job.validation.items()):
                validation.add_metric([job_id, metric], value)
            samples.add_metric([job_id], job.samples)
            durations.add_metric([job_id], job.step_durations.buckets(), job.step_durations.sum)
        yield validation
        yield samples
        yield durations
        checkpoints = HistogramMetricFamily(
            "trainbus_checkpoint_write_seconds",
            "Time to snapshot and durably write a checkpoint.",
        )
        checkpoints.add_metric([], self._checkpoint_seconds.buckets(), self._checkpoint_seconds.sum)
        yield checkpoints

    def _collect_resources(self) -> Iterator[Metric]:
        host = GaugeMetricFamily(
            "trainbus_host_cpu_utilization_ratio", "CPU utilisation of the whole host (0..1)."
        )
        if self._host_cpu is not None:
            host.add_metric([], self._host_cpu)
        yield host
        fields = [
            ("utilization_ratio", "GPU utilisation (DCGM_FI_DEV_GPU_UTIL / 100)."),
            ("memory_used_bytes", "Framebuffer memory used (DCGM_FI_DEV_FB_USED, in bytes)."),
            ("memory_total_bytes", "Framebuffer memory in all (FB_USED + FB_FREE, in bytes)."),
            ("temperature_celsius", "GPU temperature (DCGM_FI_DEV_GPU_TEMP)."),
            ("power_watts", "Power draw (DCGM_FI_DEV_POWER_USAGE)."),
            ("torch_allocated_bytes", "Memory held by tensors in torch's CUDA allocator."),
            ("torch_reserved_bytes", "Memory reserved by torch's CUDA caching allocator."),
        ]
        for key, doc in fields:
            family = GaugeMetricFamily(f"trainbus_gpu_{key}", doc, labels=["gpu", "name"])
            for index, gpu in sorted(self._gpus.items()):
                value = _number(gpu.get(key))
                if value is not None and math.isfinite(value):
                    family.add_metric([str(index), str(gpu.get("name") or "")], value)
            yield family
        yield from self._collect_workers()

    def _collect_workers(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "trainbus_job_cpu_seconds",
            "CPU time (user + system) of the job's worker process.",
            labels=["job_id"],
        )
        rss = GaugeMetricFamily(
            "trainbus_job_resident_memory_bytes",
            "Resident memory of the job's worker process.",
            labels=["job_id"],
        )
        gpu_memory = GaugeMetricFamily(
            "trainbus_job_gpu_memory_bytes",
            "GPU memory the job's worker process holds (NVML, matched by pid).",
            labels=["job_id", "gpu"],
        )
        rank_cpu = CounterMetricFamily(
            "trainbus_job_rank_cpu_seconds",
            "CPU time (user + system) of each rank of a distributed job.",
            labels=["job_id", "rank"],
        )
        rank_rss = GaugeMetricFamily(
            "trainbus_job_rank_resident_memory_bytes",
            "Resident memory of each rank of a distributed job.",
            labels=["job_id", "rank"],
        )
        rank_gpu_memory = GaugeMetricFamily(
            "trainbus_job_rank_gpu_memory_bytes",
            "GPU memory each rank of a distributed job holds (NVML, matched by pid).",
            labels=["job_id", "rank", "gpu"],
        )
        for job_id, worker in sorted(self._workers.items()):
            _add_process(worker, [job_id], cpu, rss, gpu_memory)
            ranks = worker.get("ranks")
            for rank in ranks if isinstance(ranks, list) else ():
                if isinstance(rank, Mapping) and isinstance(rank.get("rank"), int):
                    labels = [job_id, str(rank["rank"])]
                    _add_process(rank, labels, rank_cpu, rank_rss, rank_gpu_memory)
        yield from (cpu, rss, gpu_memory, rank_cpu, rank_rss, rank_gpu_memory)


def _add_process(
    figures: Mapping[str, Any],
    labels: list[str],
    cpu: CounterMetricFamily,
    rss: GaugeMetricFamily,
    gpu_memory: GaugeMetricFamily,
) -> None:
    """One process's figures of a resource sample into the families, under ``labels``."""
    for family, key in ((cpu, "cpu_seconds"), (rss, "rss_bytes")):
        value = _number(figures.get(key))
        if value is not None and math.isfinite(value):
            family.add_metric(labels, value)
    gpus = figures.get("gpus")
    for gpu in gpus if isinstance(gpus, list) else ():
        used = _number(gpu.get("memory_used_bytes")) if isinstance(gpu, Mapping) else None
        if used is not None and math.isfinite(used):
            gpu_memory.add_metric([*labels, str(gpu.get("index"))], used)


class _Collector(Collector):
    def __init__(self, exporter: PrometheusExporter) -> None:
        self.exporter = exporter

    def collect(self) -> Iterable[Metric]:
        return list(self.exporter._collect())
