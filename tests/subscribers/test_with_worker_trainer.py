"""The per-job subscribers bound to the real ``trainbus.worker.Trainer`` (built from a job spec)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import torch

from trainbus import worker
from trainbus.bus import ControlChannel, Event, EventBus, EventType, JobState
from trainbus.subscribers import (
    CheckpointWriter,
    EarlyStopController,
    LRPlateauController,
    latest_valid_state,
    list_checkpoints,
)


async def test_real_trainer_checkpoints_and_early_stop(data_dir: Path) -> None:
    spec = worker.JobSpec.model_validate(
        {
            "model": {"name": "mlp"},
            "dataset": {"name": "digits"},
            "epochs": 8,
            "batch_size": 64,
            "batch_event_every": 10,
            "torch_threads": 1,
            "checkpoint": {"keep_last": 2, "keep_best": 1},
            "early_stop": {
                "enabled": True,
                "monitor": "val_accuracy",
                "mode": "max",
                "stopping_threshold": 0.5,
                "restore_best": True,
            },
            "lr_plateau": {"enabled": True, "patience": 1},
        }
    )
    job_dir = data_dir / "jobs" / "real-1"
    async with EventBus() as bus:
        control = ControlChannel("real-1", publish=bus.publish)
        trainer = await anyio.to_thread.run_sync(
            lambda: worker.Trainer(
                job_id="real-1", spec=spec, bus=bus, control=control, data_dir=job_dir
            )
        )
        subscribers = [
            CheckpointWriter(
                job_id="real-1",
                job_dir=job_dir,
                bus=bus,
                **spec.checkpoint.model_dump(exclude={"enabled"}),
            ),
            EarlyStopController(
                job_id="real-1",
                channel=control,
                bus=bus,
                **spec.early_stop.model_dump(exclude={"enabled"}),
            ),
            LRPlateauController(
                job_id="real-1",
                channel=control,
                bus=bus,
                **spec.lr_plateau.model_dump(exclude={"enabled"}),
            ),
        ]
        for subscriber in subscribers:
            subscriber.bind(trainer)
        handles = [bus.attach(s) for s in subscribers]
        async with bus.subscribe("t", job_id="real-1", types=[EventType.EARLY_STOP]) as sub:
            result = await anyio.to_thread.run_sync(trainer.run)
            with anyio.fail_after(10):
                early_stop = await sub.receive()
        for handle in handles:
            await handle.detach()
    assert early_stop.data["reason"] == "stopping_threshold"
    assert result.stop_reason is not None and "stopping_threshold" in result.stop_reason
    infos = list_checkpoints(job_dir)
    assert infos and infos[0].epoch == early_stop.data["epoch"]
    state = latest_valid_state("real-1", job_dir)
    assert state is not None and "early_stop" in state["controllers"]
    assert "lr_plateau" in state["controllers"]


async def run_with_subscribers(
    spec: Any,
    job_dir: Path,
    *,
    events: list[str] | None = None,
    state: dict[str, Any] | None = None,
    job_id: str = "real-2",
) -> tuple[Any, Any, list[Event]]:
    """Train ``spec`` with the checkpoint writer and early stopping bound, as the server does;
    the run's result, the trainer, and the events of ``events`` types in seq order."""
    async with EventBus() as bus:
        control = ControlChannel(job_id, publish=bus.publish)
        trainer = await anyio.to_thread.run_sync(
            lambda: worker.Trainer(
                job_id=job_id, spec=spec, bus=bus, control=control, data_dir=job_dir
            )
        )
        subscribers: list[Any] = [
            CheckpointWriter(
                job_id=job_id,
                job_dir=job_dir,
                bus=bus,
                **spec.checkpoint.model_dump(exclude={"enabled"}),
            )
        ]
        if spec.early_stop.enabled:
            subscribers.append(
                EarlyStopController(
                    job_id=job_id,
                    channel=control,
                    bus=bus,
                    **spec.early_stop.model_dump(exclude={"enabled"}),
                )
            )
        for subscriber in subscribers:
            subscriber.bind(trainer)
        if state is not None:
            trainer.load_state_dict(state)
        handles = [bus.attach(s) for s in subscribers]
        seen = bus.subscribe("seen", job_id=job_id, types=events or [], buffer_size=1_000_000)
        result = await anyio.to_thread.run_sync(trainer.run)
        for handle in handles:
            await handle.detach()  # the writer has written and published everything
        received = seen.receive_batch_nowait() if events else []
    return result, trainer, sorted(received, key=lambda e: e.seq)


def iris_spec(**overrides: Any) -> Any:
    spec: dict[str, Any] = {
        "model": {"name": "mlp", "params": {"hidden_sizes": [16], "dropout": 0.2}},
        "dataset": {"name": "iris"},
        "epochs": 2,
        "batch_size": 16,
        "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "seed": 3,
    }
    spec.update(overrides)
    return worker.JobSpec.model_validate(spec)


async def test_restore_best_leaves_the_best_weights_in_the_final_checkpoint(
    data_dir: Path,
) -> None:
    spec = iris_spec(
        epochs=15,
        optimizer={"name": "sgd", "lr": 0.5, "momentum": 0.9},
        early_stop={"enabled": True, "monitor": "val_loss", "patience": 2, "restore_best": True},
    )
    job_dir = data_dir / "jobs" / "best"
    result, trainer, _ = await run_with_subscribers(spec, job_dir)
    assert result.stop_reason == "patience_exhausted"
    final = list_checkpoints(job_dir)[0]
    state = latest_valid_state("best", job_dir)
    assert state is not None and final.epoch == trainer.epoch
    best = state["controllers"]["early_stop"]
    assert best["best_weights_epoch"] < trainer.epoch  # the test means something
    for name, value in best["best_weights"].items():
        assert torch.equal(state["model"][name], value), name
    manifest = json.loads((final.path / "manifest.json").read_text())
    assert manifest["weights"] == {
        "source": "early_stop.restore_best",
        "epoch": best["best_weights_epoch"],
        "monitor": "val_loss",
        "value": best["best"],
    }


async def test_a_step_checkpoint_follows_the_batch_events_of_its_step(data_dir: Path) -> None:
    spec = iris_spec(epochs=3, batch_event_every=1, checkpoint={"every_n_steps": 3})
    _, _, events = await run_with_subscribers(
        spec, data_dir / "jobs" / "steps", events=["train_batch_end", "checkpoint_saved"]
    )
    saved = [
        e for e in events if e.type is EventType.CHECKPOINT_SAVED and e.data["reason"] == "step"
    ]
    assert saved  # routine step checkpoints may be coalesced when the disk is slow
    batch_seqs = {e.data["step"]: e.seq for e in events if e.type is EventType.TRAIN_BATCH_END}
    for checkpoint in saved:
        step = checkpoint.data["step"]
        assert all(batch_seqs[s] < checkpoint.seq for s in range(1, step + 1)), step


async def test_a_run_resumed_after_its_last_epoch_names_its_checkpoint_as_an_uninterrupted_one(
    data_dir: Path,
) -> None:
    spec = iris_spec()
    await run_with_subscribers(spec, data_dir / "jobs" / "reference", job_id="reference")
    expected = list_checkpoints(data_dir / "jobs" / "reference")[0]

    def paused_after_the_last_epoch() -> dict[str, Any]:
        trainer = worker.Trainer(
            job_id="paused",
            spec=spec,
            bus=bus,
            control=ControlChannel("paused", publish=bus.publish),
            data_dir=data_dir,
        )
        trainer.add_callback(
            "on_fit_epoch_end", lambda t: t.control.pause("end") if t.epoch == 1 else None
        )
        trainer.add_callback(
            "on_model_save", lambda t: t.control.close() if t.save_reason == "pause" else None
        )
        assert trainer.run().outcome is worker.Outcome.INTERRUPTED
        return trainer.state_dict()

    async with EventBus() as bus:
        state = await anyio.to_thread.run_sync(paused_after_the_last_epoch)
    job_dir = data_dir / "jobs" / "resumed"
    _, _, events = await run_with_subscribers(
        spec, job_dir, events=["model_save", "train_end"], state=state, job_id="resumed"
    )
    assert [(e.type.value, e.data["epoch"]) for e in events] == [
        ("model_save", expected.epoch),
        ("train_end", expected.epoch),
    ]
    assert [info.name for info in list_checkpoints(job_dir)] == [expected.name]


async def test_a_shutdown_leaves_a_checkpoint_to_resume_from_whatever_save_on_pause(
    data_dir: Path,
) -> None:
    def writer_only(handle: Any) -> list[Any]:
        writer = CheckpointWriter(
            job_id=handle.id,
            job_dir=handle.job_dir,
            bus=bus,
            every_n_epochs=None,
            keep_best=0,
            save_on_pause=False,
        )
        writer.bind(handle.trainer)
        return [writer]

    spec = iris_spec(epochs=500).model_dump(mode="json")
    async with EventBus() as bus:
        batches = bus.subscribe("batches", types=["train_batch_end"], buffer_size=1_000_000)
        async with worker.JobManager(
            bus=bus, data_dir=data_dir, max_running=2, subscriber_factory=writer_only
        ) as manager:
            running = await manager.submit(spec)
            paused = await manager.submit(spec)
            seen: set[str] = set()
            while seen != {running.id, paused.id}:
                seen.add((await batches.receive()).job_id)
            manager.pause(paused.id)  # by a user, before the shutdown
            await manager.wait_for(paused.id, ["paused"], timeout=30)
            await manager.shutdown(timeout=30)
        for job in (running, paused):
            job_dir = data_dir / "jobs" / job.id
            (job_dir / "resume-state.pt").unlink(missing_ok=True)  # the checkpoint alone must do
            (latest,) = list_checkpoints(job_dir)
            assert latest.reason == "shutdown"
            async with worker.JobManager(
                bus=bus,
                data_dir=data_dir,
                subscriber_factory=writer_only,
                checkpoint_loader=latest_valid_state,
            ) as manager:
                assert manager.get(job.id).state is JobState.INTERRUPTED
                after = bus.subscribe("after", job_id=job.id, types=["train_batch_end"])
                await manager.resume(job.id)
                restarted = await after.receive()
                assert restarted.data["step"] == latest.step + 1  # continued, not started over
                manager.stop(job.id)
                await manager.wait_for(job.id, ["stopped"], timeout=30)
