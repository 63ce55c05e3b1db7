"""The per-job subscribers bound to the real ``worker.Trainer`` (built from a job spec)."""

from __future__ import annotations

from pathlib import Path

import anyio

import worker
from bus import ControlChannel, EventBus, EventType
from subscribers import (
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
