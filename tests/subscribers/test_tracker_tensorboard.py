"""TensorBoard exporter: event files written by a real job, read back with TensorBoard's own
``EventAccumulator``; a resumed job rewinds to its checkpoint's step instead of doubling."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from trainbus.bus import EventBus, EventType
from trainbus.subscribers import TensorBoardExporter

from .tracker_jobs import checkpoint_at_epoch, digits_spec, run_job

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _read(log_dir: Path) -> event_accumulator.EventAccumulator:
    accumulator = event_accumulator.EventAccumulator(
        str(log_dir), size_guidance={"scalars": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def _exporter(job_dir: Path, every: int = 5) -> object:
    def build(bus: EventBus) -> list[TensorBoardExporter]:
        spec = digits_spec()
        return [
            TensorBoardExporter(
                job_id="tb-1",
                bus=bus,
                log_dir=job_dir / "tensorboard",
                params=spec.model_dump(mode="json"),
                log_every_n_steps=every,
            )
        ]

    return build


async def test_epoch_metrics_step_loss_and_hparams_read_back(data_dir: Path) -> None:
    job_dir = data_dir / "jobs" / "tb-1"
    run = await run_job("tb-1", digits_spec(), job_dir, _exporter(job_dir))  # type: ignore[arg-type]
    assert run.result.outcome.value == "completed"
    accumulator = _read(job_dir / "tensorboard")
    tags = set(accumulator.Tags()["scalars"])
    assert {"train_loss", "val_loss", "val_accuracy", "lr", "epoch", "train_loss_step"} <= tags

    epoch_ends = run.of(EventType.FIT_EPOCH_END)
    val_loss = accumulator.Scalars("val_loss")
    assert [s.step for s in val_loss] == [e.data["step"] for e in epoch_ends]
    assert [s.value for s in val_loss] == pytest.approx(
        [e.data["metrics"]["val_loss"] for e in epoch_ends], rel=1e-6
    )  # float32 in the event file

    batch_ends = {e.data["step"]: e.data["loss"] for e in run.of(EventType.TRAIN_BATCH_END)}
    step_loss = accumulator.Scalars("train_loss_step")
    assert [s.step for s in step_loss] == [step for step in sorted(batch_ends) if step % 5 == 0]
    assert [s.value for s in step_loss] == pytest.approx(
        [batch_ends[s.step] for s in step_loss], rel=1e-6
    )

    texts = set(accumulator.Tags()["tensors"])
    assert {"hparams/text_summary", "checkpoints/text_summary", "end_state/text_summary"} <= texts
    hparams = accumulator.Tensors("hparams/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| optimizer.lr | 0.05 |" in hparams and "| model.name | mlp |" in hparams
    end = accumulator.Tensors("end_state/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert end == "completed"
    experiment = accumulator.PluginTagToContent("hparams")["_hparams_/experiment"]
    assert b"optimizer.lr" in experiment  # TensorBoard's HParams tab


async def test_resumed_job_rewinds_to_the_checkpoint_step(data_dir: Path) -> None:
    job_dir = data_dir / "jobs" / "tb-1"
    first = await run_job("tb-1", digits_spec(), job_dir, _exporter(job_dir))  # type: ignore[arg-type]
    name, step = checkpoint_at_epoch(job_dir, 0)

    second = await run_job(
        "tb-1",
        digits_spec(),
        job_dir,
        _exporter(job_dir),
        resume_from=name,  # type: ignore[arg-type]
    )
    resumed_start = second.of(EventType.TRAIN_START)[0]
    assert resumed_start.data["resumed"] and resumed_start.data["step"] == step

    accumulator = _read(job_dir / "tensorboard")
    for tag in ("val_loss", "train_loss_step", "lr"):
        steps = [s.step for s in accumulator.Scalars(tag)]
        assert not [s for s, n in Counter(steps).items() if n > 1], f"{tag} doubled: {steps}"
        assert steps == sorted(steps)
    # the points past the checkpoint are the resumed run's, not the first run's
    last_epoch = second.of(EventType.FIT_EPOCH_END)[-1]
    assert accumulator.Scalars("val_loss")[-1].value == pytest.approx(
        last_epoch.data["metrics"]["val_loss"], rel=1e-6
    )
    first_epoch = first.of(EventType.FIT_EPOCH_END)[0]
    assert accumulator.Scalars("val_loss")[0].step == first_epoch.data["step"]
