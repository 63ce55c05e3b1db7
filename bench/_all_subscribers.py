"""A trainbus run with every default subscriber attached, for ``bench/overhead.py``.

``await all_subscribers_run(spec, data_dir)`` trains ``spec`` as the server would: a
checkpoint each epoch (``CheckpointWriter``), ``EarlyStopController``,
``LRPlateauController``, the ``PrometheusExporter`` (rendered once per epoch, as a scrape
would), the ``ResourceMonitor`` (every second) and the ``EventStore`` (SQLite under
``data_dir``). Returns ``(seconds, samples, events published, CPU seconds of all
threads)``, like ``trainbus_run``; ``ratio_all_subscribers`` is its time over the bare
loop's. ``parts`` attaches only some of them (:data:`PARTS`), for a breakdown of the cost;
adding :data:`TRACKER_PARTS` attaches the experiment trackers too (TensorBoard under
``data_dir``, MLflow at ``mlflow_uri``, W&B offline under ``data_dir``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import ControlChannel, EventBus, EventType
from trainbus.subscribers import (
    CheckpointWriter,
    EarlyStopController,
    EventStore,
    LRPlateauController,
    MLflowExporter,
    PrometheusExporter,
    ResourceMonitor,
    TensorBoardExporter,
    TrackerSubscriber,
    WandbExporter,
)
from trainbus.worker import JobSpec, Trainer

__all__ = ["PARTS", "TRACKER_PARTS", "all_subscribers_run"]

JOB = "overhead-all"
PARTS = ("store", "exporter", "resources", "checkpoint", "controllers")
TRACKER_PARTS = ("tensorboard", "mlflow", "wandb")


def _trackers(
    parts: frozenset[str], spec: JobSpec, bus: EventBus, run_dir: Path, mlflow_uri: str
) -> list[TrackerSubscriber]:
    """The trackers named in ``parts``, as the server attaches them (default options)."""
    common: dict[str, Any] = {"job_id": JOB, "bus": bus, "params": spec.model_dump(mode="json")}
    built: list[TrackerSubscriber] = []
    if "tensorboard" in parts:
        built.append(TensorBoardExporter(log_dir=run_dir / "tensorboard", **common))
    if "mlflow" in parts:
        built.append(
            MLflowExporter(job_dir=run_dir / "jobs" / JOB, tracking_uri=mlflow_uri, **common)
        )
    if "wandb" in parts:
        os.environ.setdefault("WANDB_SILENT", "true")
        for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
            os.environ.setdefault(name, str(run_dir.parent / "wandb-home"))
        built.append(
            WandbExporter(project="trainbus-bench", mode="offline", directory=run_dir, **common)
        )
    return built


async def all_subscribers_run(
    spec: JobSpec, data_dir: Path, parts: Iterable[str] = PARTS, mlflow_uri: str = ""
) -> tuple[float, int, int, float]:
    parts = frozenset(parts)
    spec = spec.model_copy(
        update={
            "checkpoint": spec.checkpoint.model_copy(
                update={"enabled": "checkpoint" in parts, "every_n_epochs": 1}
            ),
            "early_stop": spec.early_stop.model_copy(update={"enabled": True, "patience": 100}),
            "lr_plateau": spec.lr_plateau.model_copy(update={"enabled": True, "patience": 100}),
        }
    )
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=data_dir))
    job_dir = run_dir / "jobs" / JOB
    store = EventStore(run_dir / "trainbus.db")
    await anyio.to_thread.run_sync(store.open)  # as the server does at start-up, not per job
    async with EventBus() as bus, anyio.create_task_group() as group:
        exporter = PrometheusExporter(bus=bus)
        if "exporter" in parts:
            bus.attach(exporter)
        if "store" in parts:
            bus.attach(store)
        if "resources" in parts:
            group.start_soon(ResourceMonitor(bus=bus, interval_seconds=1.0).run)
        control = ControlChannel(JOB, publish=bus.publish)
        trainer = await anyio.to_thread.run_sync(
            lambda: Trainer(job_id=JOB, spec=spec, bus=bus, control=control, data_dir=data_dir)
        )
        per_job: list[CheckpointWriter | EarlyStopController | LRPlateauController] = []
        if "checkpoint" in parts:
            per_job.append(
                CheckpointWriter(
                    job_id=JOB,
                    job_dir=job_dir,
                    bus=bus,
                    **spec.checkpoint.model_dump(exclude={"enabled"}),
                )
            )
        if "controllers" in parts:
            per_job += [
                EarlyStopController(
                    job_id=JOB,
                    channel=control,
                    bus=bus,
                    **spec.early_stop.model_dump(exclude={"enabled"}),
                ),
                LRPlateauController(
                    job_id=JOB,
                    channel=control,
                    bus=bus,
                    **spec.lr_plateau.model_dump(exclude={"enabled"}),
                ),
            ]
        for subscriber in per_job:
            subscriber.bind(trainer)
        trackers = _trackers(parts, spec, bus, run_dir, mlflow_uri)
        handles = [bus.attach(subscriber) for subscriber in per_job]
        tracker_handles = [bus.attach(tracker) for tracker in trackers]
        if "exporter" in parts:
            scrapes = bus.subscribe("scrapes", job_id=JOB, types=[EventType.FIT_EPOCH_END])

            async def scrape() -> None:
                async with scrapes:
                    async for _ in scrapes:
                        await anyio.to_thread.run_sync(exporter.render)

            group.start_soon(scrape)
        started = time.perf_counter()
        cpu_started = time.process_time()  # every thread: training, loop, subscribers, writer
        await anyio.to_thread.run_sync(trainer.run)
        for handle in handles:
            await handle.detach()  # the last checkpoint is durable
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        # Not timed: what a tracker still holds once the job has ended is written after it
        # (closing a W&B run alone takes about a second), which no training waits for.
        for handle in tracker_handles:
            await handle.detach()
        if any(t.statistics().dropped or t.statistics().failures for t in trackers):
            raise SystemExit(f"a tracker failed: {[t.statistics() for t in trackers]}")
        published = bus.last_seq(JOB)
        group.cancel_scope.cancel()
    store.close()
    shutil.rmtree(run_dir, ignore_errors=True)
    return elapsed, spec.epochs * len(trainer.y_train), published, cpu
