"""Real small jobs for the tracker tests: a ``trainbus.worker.Trainer`` on the digits data set with
the checkpoint writer and the trackers under test attached, resumable from a checkpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio

from trainbus.bus import ControlChannel, Event, EventBus, EventType, SubscriberHandle
from trainbus.subscribers import (
    CheckpointWriter,
    TrackerSubscriber,
    list_checkpoints,
    load_checkpoint,
)
from trainbus.worker import JobSpec, RunResult, Trainer


def digits_spec(epochs: int = 3, **overrides: Any) -> JobSpec:
    spec: dict[str, Any] = {
        "name": "digits-tracked",
        "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
        "dataset": {"name": "digits"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "epochs": epochs,
        "batch_size": 64,
        "torch_threads": 1,
        "checkpoint": {"keep_last": 10},
    }
    spec.update(overrides)
    return JobSpec.model_validate(spec)


@dataclass
class JobRun:
    result: RunResult
    events: list[Event] = field(default_factory=list)
    """Every event of the job, in order."""
    duration: float = 0.0

    def of(self, event_type: EventType) -> list[Event]:
        return [event for event in self.events if event.type is event_type]


async def run_job(
    job_id: str,
    spec: JobSpec,
    job_dir: Path,
    trackers: Callable[[EventBus], Sequence[TrackerSubscriber]],
    *,
    resume_from: str | None = None,
    prepare: Callable[[Trainer], None] | None = None,
    after_run: Callable[[EventBus, list[SubscriberHandle]], Awaitable[None]] | None = None,
) -> JobRun:
    """Run ``job_id`` to its end (from checkpoint ``resume_from`` when given) with a checkpoint
    writer and ``trackers(bus)`` attached; the trackers are detached (drained) before return.
    ``prepare(trainer)`` may add inline callbacks before the run; ``after_run(bus, handles)``
    is awaited once training has returned, before the subscribers are drained."""
    async with EventBus() as bus:
        control = ControlChannel(job_id, publish=bus.publish)
        trainer = await anyio.to_thread.run_sync(
            lambda: Trainer(job_id=job_id, spec=spec, bus=bus, control=control, data_dir=job_dir)
        )
        options = spec.checkpoint.model_dump(exclude={"enabled"})
        writer = CheckpointWriter(job_id=job_id, job_dir=job_dir, bus=bus, **options)
        writer.bind(trainer)
        if prepare is not None:
            prepare(trainer)
        handles = [bus.attach(writer), *(bus.attach(s) for s in trackers(bus))]
        if resume_from is not None:
            state = load_checkpoint(job_dir, resume_from)
            await anyio.to_thread.run_sync(trainer.load_state_dict, state)
        events: list[Event] = []
        async with bus.subscribe("test", job_id=job_id, buffer_size=1_000_000) as subscription:
            started = anyio.current_time()
            result = await anyio.to_thread.run_sync(trainer.run)
            duration = anyio.current_time() - started
            if after_run is not None:
                await after_run(bus, handles)
            for handle in handles:
                await handle.detach()
            last = bus.last_seq(job_id)
            with anyio.fail_after(10):
                while not events or events[-1].seq < last:
                    events.extend(await subscription.receive_batch(100_000))
    return JobRun(result, events, duration)


def checkpoint_at_epoch(job_dir: Path, epoch: int) -> tuple[str, int]:
    """The name and step of the epoch-end checkpoint of ``epoch``."""
    for info in list_checkpoints(job_dir):
        if info.epoch == epoch and info.reason == "epoch_end":
            return info.name, info.step
    raise AssertionError(f"no epoch_end checkpoint of epoch {epoch} in {job_dir}")
