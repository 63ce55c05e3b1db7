"""The per-job subscribers together on a bus, around a small real training loop."""

from __future__ import annotations

from pathlib import Path

import anyio

from trainbus.bus import CommandKind, ControlChannel, EventBus, EventType
from trainbus.subscribers import (
    CheckpointWriter,
    EarlyStopController,
    EventStore,
    LRPlateauController,
    latest_valid_state,
    list_checkpoints,
)

from .toy import ToyTrainer

# val_loss per epoch: improves, then a plateau that first lowers the lr, then stops the job
VAL_LOSSES = [1.0, 0.8, 0.7, 0.75, 0.72, 0.74, 0.73, 0.9, 0.9]


def _run_job(bus: EventBus, trainer: ToyTrainer, epochs: int) -> str | None:
    """The trainer's side, on a plain thread: epochs, fit_epoch_end, commands at boundaries."""
    while trainer.epoch < epochs:
        for _ in range(2):
            trainer.train_step()
        trainer.metrics["val_loss"] = VAL_LOSSES[trainer.epoch]
        trainer.metrics["lr"] = float(trainer.optimizer.param_groups[0]["lr"])
        trainer.run_callbacks("on_fit_epoch_end")
        event = bus.publish(
            trainer.job_id,
            EventType.FIT_EPOCH_END,
            {"epoch": trainer.epoch, "step": trainer.step, "metrics": dict(trainer.metrics)},
        )
        assert bus.wait_processed(event, 10.0)
        trainer.save("epoch_end")
        trainer.epoch += 1
        for command in trainer.control.take():
            if command.kind is CommandKind.SET_LR:
                assert command.value is not None
                for group in trainer.optimizer.param_groups:
                    group["lr"] = command.value
                trainer.control.applied(command, step=trainer.step, epoch=trainer.epoch)
            elif command.kind is CommandKind.STOP:
                trainer.control.applied(command, step=trainer.step, epoch=trainer.epoch)
                trainer.save("stop")
                return command.reason
    trainer.save("end")
    return None


def _subscribers(
    bus: EventBus, trainer: ToyTrainer, job_dir: Path
) -> tuple[CheckpointWriter, EarlyStopController, LRPlateauController]:
    writer = CheckpointWriter(job_id="job-1", job_dir=job_dir, bus=bus, keep_last=2, keep_best=1)
    early = EarlyStopController(
        job_id="job-1", channel=trainer.control, bus=bus, patience=4, restore_best=True
    )
    plateau = LRPlateauController(
        job_id="job-1", channel=trainer.control, factor=0.5, patience=2, min_delta=0.0
    )
    for subscriber in (writer, early, plateau):
        subscriber.bind(trainer)
    return writer, early, plateau


async def test_early_stop_lr_plateau_checkpoints_and_store(data_dir: Path) -> None:
    job_dir = data_dir / "jobs" / "job-1"
    store = EventStore(data_dir / "trainbus.db")
    async with EventBus() as bus:
        store_handle = bus.attach(store)
        trainer = ToyTrainer()
        trainer.control = ControlChannel("job-1", publish=bus.publish)
        subscribers = _subscribers(bus, trainer, job_dir)
        handles = [bus.attach(s) for s in subscribers]
        reason = await anyio.to_thread.run_sync(_run_job, bus, trainer, len(VAL_LOSSES))
        trainer.run_callbacks("on_train_end")
        for handle in handles:
            await handle.detach()  # the writer finishes its writes here
        last = bus.publish("job-1", EventType.JOB_COMPLETED, {"stop_reason": reason})
        assert await anyio.to_thread.run_sync(bus.wait_processed, last, 10.0)
        await store_handle.detach()

    # lr: 0.01 until the plateau at epochs 3-4, halved once; patience 4 ends it at epoch 6
    assert reason == "patience_exhausted"
    types = [e.type for e in store.read("job-1")]
    assert types.count(EventType.LR_CHANGED) == 1 and types.count(EventType.EARLY_STOP) == 1
    (lr_changed,) = store.read("job-1", types=[EventType.LR_CHANGED])
    assert lr_changed.data["source"] == "lr_plateau" and lr_changed.data["value"] == 0.005
    (early_stop,) = store.read("job-1", types=[EventType.EARLY_STOP])
    assert early_stop.data["best"] == 0.7 and early_stop.data["best_epoch"] == 2
    assert early_stop.data["epoch"] == 6
    saved = store.read("job-1", types=[EventType.CHECKPOINT_SAVED])
    assert [e.data["reason"] for e in saved][-1] == "stop"
    assert {info.name for info in list_checkpoints(job_dir)} >= {
        e.data["name"] for e in saved if e.data["best"]
    } - {saved[0].data["name"], saved[1].data["name"]}
    store.close()

    # resume from the last checkpoint: the controllers' counters come back with it
    state = latest_valid_state("job-1", job_dir)
    assert state is not None
    assert state["controllers"]["early_stop"]["wait"] == 4
    assert state["controllers"]["early_stop"]["best"] == 0.7
    assert state["controllers"]["lr_plateau"]["best"] == 0.7
    resumed = ToyTrainer()
    _, early, plateau = _subscribers(EventBus(), resumed, data_dir / "elsewhere")
    resumed.load_state_dict(state)
    assert early.rules.wait == 4 and early.rules.best_epoch == 2
    assert plateau.rules.state_dict() == state["controllers"]["lr_plateau"]
