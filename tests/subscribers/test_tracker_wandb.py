"""W&B exporter in offline mode (no network): the run's local ``run-<id>.wandb`` files read
back record by record (config, stepped history, summary, exit code); a resumed job
continues the same run id from its checkpoint's step."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from trainbus.bus import EventBus, EventType
from trainbus.subscribers import WandbExporter

from .tracker_jobs import checkpoint_at_epoch, digits_spec, run_job

wandb_internal_pb2 = pytest.importorskip("wandb.proto.wandb_internal_pb2")

_BLOCK = 32 * 1024
_FILE_HEADER = 7  # ":W&B", a 2-byte magic, a version byte
_FULL, _LAST = 1, 4


def wandb_records(path: Path) -> Iterator[Any]:
    """The ``Record`` messages of an offline run file (LevelDB log framing in 32 KiB blocks)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    position, pending = _FILE_HEADER, b""
    while position + 7 <= len(data):
        left = _BLOCK - position % _BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            position += left
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if (length == 0 and kind == 0) or position + 7 + length > len(data):
            break  # the end, or a record still being written
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (_FULL, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


class OfflineRun:
    """What one offline run file holds."""

    def __init__(self, path: Path) -> None:
        self.run_id = ""
        self.started = (0, 0)
        self.config: dict[str, Any] = {}
        self.history: list[tuple[int, dict[str, Any]]] = []
        self.summary: dict[str, Any] = {}
        self.exit_code: int | None = None
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                self.run_id = record.run.run_id
                self.started = (record.run.start_time.seconds, record.run.start_time.nanos)
                for item in record.run.config.update:
                    self.config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                row = {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
                self.history.append((record.history.step.num, row))
            elif kind == "summary":
                for item in record.summary.update:
                    self.summary[item.key or "/".join(item.nested_key)] = json.loads(
                        item.value_json
                    )
            elif kind == "exit":
                self.exit_code = record.exit.exit_code

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, row[key]) for step, row in self.history if key in row]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name, value in {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_DATA_DIR": str(tmp_path / "wandb-data"),
    }.items():
        monkeypatch.setenv(name, value)


def _exporter(job_dir: Path) -> Any:
    def build(bus: EventBus) -> list[WandbExporter]:
        return [
            WandbExporter(
                job_id="wb/1",
                bus=bus,
                project="trainbus-tests",
                mode="offline",
                directory=job_dir,
                params=digits_spec().model_dump(mode="json"),
                log_every_n_steps=5,
            )
        ]

    return build


def _runs(job_dir: Path, count: int) -> list[OfflineRun]:
    """The job's ``count`` offline runs, oldest first, once each file is complete: W&B's
    service process (wandb-core) may still be writing a run's file when ``finish()`` returns."""
    deadline = time.monotonic() + 20
    while True:
        runs = [OfflineRun(path) for path in job_dir.glob("wandb/offline-run-*/run-*.wandb")]
        complete = [run for run in runs if run.run_id and run.exit_code is not None]
        if len(complete) == count or time.monotonic() > deadline:
            return sorted(runs, key=lambda run: run.started)
        time.sleep(0.05)  # another process's file: its content is the only signal


async def test_offline_run_files_hold_config_history_summary_and_exit(
    data_dir: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    job_dir = data_dir / "jobs" / "wb-1"
    run = await run_job("wb/1", digits_spec(), job_dir, _exporter(job_dir))
    assert not run.of(EventType.SUBSCRIBER_ERROR)
    [offline] = _runs(job_dir, 1)
    assert offline.run_id == "wb-1"
    assert offline.config["optimizer.lr"] == 0.05
    assert offline.config["model.params.hidden_sizes"] == [32]
    epoch_ends = run.of(EventType.FIT_EPOCH_END)
    assert offline.series("val_loss") == [
        (e.data["step"], pytest.approx(e.data["metrics"]["val_loss"])) for e in epoch_ends
    ]
    batch_steps = [e.data["step"] for e in run.of(EventType.TRAIN_BATCH_END)]
    assert [step for step, _ in offline.series("train_loss_step")] == [
        step for step in batch_steps if step % 5 == 0
    ]
    assert offline.summary["trainbus/end_state"] == "completed"
    saved = run.of(EventType.CHECKPOINT_SAVED)
    assert offline.summary["checkpoint/latest"] == saved[-1].data["name"]
    assert offline.exit_code == 0
    assert "wandb" not in capfd.readouterr().out  # nothing on stdout (no run URL)


async def test_resumed_job_continues_the_run_from_the_checkpoint_step(data_dir: Path) -> None:
    job_dir = data_dir / "jobs" / "wb-1"
    await run_job("wb/1", digits_spec(), job_dir, _exporter(job_dir))
    name, step = checkpoint_at_epoch(job_dir, 0)
    second = await run_job("wb/1", digits_spec(), job_dir, _exporter(job_dir), resume_from=name)
    first_run, resumed_run = _runs(job_dir, 2)
    assert resumed_run.run_id == first_run.run_id == "wb-1"
    resumed_steps = [s for s, _ in resumed_run.history]
    assert resumed_steps and min(resumed_steps) > step
    assert resumed_run.series("val_loss") == [
        (e.data["step"], pytest.approx(e.data["metrics"]["val_loss"]))
        for e in second.of(EventType.FIT_EPOCH_END)
    ]
