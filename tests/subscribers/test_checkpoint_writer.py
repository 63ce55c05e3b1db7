"""The checkpoint writer on a real (small) training loop."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from trainbus.bus import Event, EventBus, EventType
from trainbus.subscribers import (
    CheckpointWriter,
    checkpoint_path,
    list_checkpoints,
    load_checkpoint,
)

from .toy import ToyTrainer


def _writer(job_dir: Path, bus: EventBus | None = None, **kwargs: Any) -> CheckpointWriter:
    return CheckpointWriter(job_id="job-1", job_dir=job_dir, bus=bus, **kwargs)


def test_every_epoch_with_retention_and_best(tmp_path: Path) -> None:
    trainer = ToyTrainer()
    writer = _writer(tmp_path, keep_last=2, keep_best=1)
    writer.bind(trainer)
    for val_loss in (0.5, 0.2, 0.7, 0.9):
        trainer.train_step()
        trainer.end_epoch({"val_loss": val_loss})
        writer.flush()
    names = [info.name for info in list_checkpoints(tmp_path)]
    assert names == [
        "epoch-0004-step-00000004",
        "epoch-0003-step-00000003",
        "epoch-0002-step-00000002",
    ]
    assert checkpoint_path(tmp_path, "best").name == "epoch-0002-step-00000002"
    assert checkpoint_path(tmp_path, "latest").name == names[0]
    stats = writer.statistics()
    assert stats.written == 4 and stats.failed == 0
    writer.close()


def test_resume_is_exact(tmp_path: Path) -> None:
    trainer = ToyTrainer()
    writer = _writer(tmp_path)
    writer.bind(trainer)
    for _ in range(3):
        trainer.train_step()
    trainer.end_epoch()
    writer.flush()
    expected = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):  # the live model moves on; the snapshot must not
        trainer.train_step()
    resumed = ToyTrainer()
    resumed.load_state_dict(load_checkpoint(tmp_path))
    assert resumed.step == 3 and resumed.epoch == 0
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[key])
    # both continue identically
    trainer2 = ToyTrainer()
    trainer2.load_state_dict(load_checkpoint(tmp_path))
    assert resumed.train_step() == trainer2.train_step()
    writer.close()


def test_triggers(tmp_path: Path) -> None:
    trainer = ToyTrainer()
    writer = _writer(
        tmp_path,
        every_n_epochs=None,
        every_n_steps=2,
        save_on_pause=False,
        keep_last=100,
        keep_best=0,
    )
    writer.bind(trainer)
    for _ in range(5):
        trainer.train_step()
        writer.flush()
    trainer.save("pause")  # off
    trainer.end_epoch()  # no periodic epoch saves, keep_best=0: no best
    trainer.save("stop")
    trainer.save("command")
    writer.flush()
    reasons = sorted(info.reason for info in list_checkpoints(tmp_path))
    assert reasons == ["command", "step", "step", "stop"]
    writer.close()


def test_essential_requests_are_never_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainbus.subscribers._checkpoint_writer as module

    gate = threading.Event()
    entered = threading.Event()
    real_write = module.write_checkpoint

    def slow_write(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert gate.wait(10)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(module, "write_checkpoint", slow_write)
    trainer = ToyTrainer()
    writer = _writer(tmp_path, every_n_epochs=1, keep_last=100, keep_best=0)
    writer.bind(trainer)
    trainer.end_epoch()  # in flight (blocked)
    assert entered.wait(10)
    trainer.end_epoch()  # pending, routine
    trainer.end_epoch()  # replaces the routine pending one
    assert writer.statistics().replaced == 1
    done = threading.Event()

    def essential_saves() -> None:
        trainer.save("pause")  # replaces the routine pending one
        trainer.save("stop")  # waits for the slot: the pause one must not be dropped
        done.set()

    thread = threading.Thread(target=essential_saves)
    thread.start()
    assert not done.wait(0.2)
    gate.set()
    thread.join(10)
    assert writer.flush(10)
    reasons = [info.reason for info in reversed(list_checkpoints(tmp_path))]
    assert reasons == ["epoch_end", "pause", "stop"]
    stats = writer.statistics()
    assert stats.replaced == 2 and stats.written == 3 and stats.waited_seconds > 0
    writer.close()


async def test_publishes_checkpoint_saved(tmp_path: Path) -> None:
    async with EventBus() as bus:
        writer = _writer(tmp_path, bus=bus)
        handle = bus.attach(writer)
        received: list[Event] = []
        async with bus.subscribe("t", job_id="job-1", types=[EventType.CHECKPOINT_SAVED]) as sub:

            def train() -> None:
                trainer = ToyTrainer()
                writer.bind(trainer)
                trainer.train_step()
                trainer.end_epoch({"val_loss": 0.25})

            await anyio.to_thread.run_sync(train)
            await writer.aflush()
            with anyio.fail_after(5):
                received.append(await sub.receive())
        await handle.detach()
    data = received[0].data
    assert data["name"] == "epoch-0001-step-00000001"  # the first epoch, counted from 1
    assert data["metric"] == 0.25 and data["best"] is True and data["reason"] == "epoch_end"
    assert data["bytes"] > 0 and data["seconds"] > 0 and data["epoch"] == 0 and data["step"] == 1


def test_best_survives_a_new_writer(tmp_path: Path) -> None:
    trainer = ToyTrainer()
    writer = _writer(tmp_path, every_n_epochs=None, keep_best=1)
    writer.bind(trainer)
    trainer.end_epoch({"val_loss": 0.1})
    writer.close()
    again = _writer(tmp_path, every_n_epochs=None, keep_best=1)
    trainer2 = ToyTrainer()
    again.bind(trainer2)
    trainer2.end_epoch({"val_loss": 0.2})  # not better than the best on disk: no save
    again.close()
    assert len(list_checkpoints(tmp_path)) == 1


def test_snapshot_keeps_checkpoints_loadable_with_weights_only(tmp_path: Path) -> None:
    import enum

    import numpy as np

    from trainbus.subscribers._checkpoint_files import write_checkpoint
    from trainbus.subscribers._snapshot import snapshot

    class Color(enum.StrEnum):
        RED = "red"

    state = {"reason": Color.RED, "value": np.float64(0.5), "count": np.int64(3), "t": (1, [2])}
    copied = snapshot(state)
    assert copied == {"reason": "red", "value": 0.5, "count": 3, "t": (1, [2])}
    assert type(copied["reason"]) is str and type(copied["value"]) is float
    info = write_checkpoint(tmp_path, copied, epoch=0, step=0, reason="command")
    assert load_checkpoint(tmp_path, info.name) == copied


def test_serials_keep_rising_across_a_write_that_failed_after_its_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer numbers checkpoints itself; a write whose last fsync fails has its folder in
    # place already, and the next checkpoint must still come after it (and a new writer after
    # both): the newest is what an interrupted job resumes from
    import trainbus.subscribers._checkpoint_files as files

    trainer = ToyTrainer()
    writer = _writer(tmp_path, keep_last=5)
    writer.bind(trainer)
    real_fsync_dir = files._fsync_dir
    failing = {"on": False}

    def fsync_dir(path: Path) -> None:
        if failing["on"] and path.name == "checkpoints":
            failing["on"] = False
            raise OSError(5, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(files, "_fsync_dir", fsync_dir)
    for epoch in range(3):
        trainer.train_step()
        failing["on"] = epoch == 1
        trainer.end_epoch({"val_loss": 1.0})
        writer.flush()
    assert writer.statistics().failed == 1
    serials = [info.serial for info in list_checkpoints(tmp_path)]  # newest first
    assert serials == [3, 2, 1]
    writer.close()
    # a new run's writer: the old one no longer hears this trainer (a resumed job builds both anew)
    trainer.callbacks.remove_callback("on_model_save", writer.on_model_save_callback)
    again = _writer(tmp_path, keep_last=5)
    again.bind(trainer)
    trainer.train_step()
    trainer.end_epoch({"val_loss": 1.0})
    again.flush()
    assert list_checkpoints(tmp_path)[0].serial == 4
    assert checkpoint_path(tmp_path, "latest") == list_checkpoints(tmp_path)[0].path
    again.close()
