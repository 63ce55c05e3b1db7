"""Disk full, short writes and I/O errors while a real job in a real server checkpoints.

The faults are injected at the lowest layer the checkpoint files call: the ``os`` module of
``trainbus.subscribers._checkpoint_files`` is replaced by one whose ``write`` (the system call,
with no buffered layer above it to retry) accepts only part of what it is given or fails with ENOSPC
as a full disk does (bytes that fit are written first, then the error), and whose ``fsync``
of a state file can fail with EIO. No root is needed.

What trainbus does, and what this checks: a failed checkpoint write leaves no files behind,
the ``latest`` and ``best`` pointers keep naming the last good checkpoint (which still
verifies and loads), the failure is reported over the API as a ``subscriber_error`` event
whose message names the cause ("No space left on device") and the last good checkpoint, and
the job keeps training: a disk that fills for a while costs the checkpoints it refused, not
the run, and saving resumes by itself once space returns. (A user who would rather stop can
watch for that event; the job's last good checkpoint is always resumable.)

A tmpfs of a few kilobytes in a user namespace would give a real ENOSPC, but needs user
namespaces that CI machines often disable; the fault layer needs nothing.
"""

from __future__ import annotations

import errno
import os
import random
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

import trainbus.subscribers._checkpoint_files as checkpoint_files
from trainbus.api import TrainbusClient, create_app
from trainbus.subscribers import (
    CheckpointWriter,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

from ..api.server import make_settings, run_server
from ..subscribers.toy import ToyTrainer
from .conftest import poll, record, unfinished_checkpoint_entries

pytestmark = pytest.mark.slow

SEED = 7
SPEC: dict[str, Any] = {
    "name": "checkpoints-on-a-bad-disk",
    "model": {"name": "mlp", "params": {"hidden_sizes": [64]}},
    "dataset": {"name": "digits"},
    "epochs": 40,
    "batch_size": 32,
    "seed": 3,
    "device": "cpu",
    "torch_threads": 1,
    "checkpoint": {"keep_last": 2, "keep_best": 1},
}
# Each fault hits the next checkpoint written after the job resumes; "full" lasts until the
# test gives the space back, so the save at the following pause fails too.
FAULTS = (
    "enospc_state",
    "short_writes",
    "enospc_manifest",
    "enospc_latest_pointer",
    "fsync_eio",
    "full",
    "space_returned",
)
CAUSES = {"fsync_eio": os.strerror(errno.EIO)}  # the others: "No space left on device"


def _kind(path: Path) -> str:
    if path.name == "state.pt":
        return "state"
    if path.name == "manifest.json":
        return "manifest"
    if path.name.startswith(".tmp-latest-"):
        return "latest_pointer"
    return "other"


class FaultyDisk:
    """Decides, write by write, how much of what the checkpoint files write reaches disk."""

    def __init__(self, root: Path, seed: int) -> None:
        self.root = root
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.fault: str | None = None
        self.fired = 0  # faults that hit since the last arm
        self.failed_writes: set[str] = set()  # checkpoints or pointers that got an error
        self.short_writes = 0
        self.bytes_before_enospc: list[int] = []
        self.files: dict[int, _FileBudget] = {}  # open checkpoint files by descriptor

    def arm(self, fault: str | None) -> None:
        with self.lock:
            self.fault, self.fired = fault, 0

    def watched(self, path: Path) -> bool:
        return path.is_relative_to(self.root) and "checkpoints" in path.parts

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)  # everything not faulted is the real os

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        fd = os.open(path, flags, mode)
        if flags & os.O_CREAT and self.watched(Path(path)):
            budget = _FileBudget(Path(path), *self.budget(Path(path)))
            with self.lock:
                self.files[fd] = budget
        return fd

    def close(self, fd: int) -> None:
        with self.lock:
            self.files.pop(fd, None)
        os.close(fd)

    def budget(self, path: Path) -> tuple[int | None, int | None]:
        """(bytes this file may take before ENOSPC, most bytes one write call accepts)."""
        kind = _kind(path)
        with self.lock:
            fault = self.fault
            if fault == "full" and kind != "other":
                self.fired += 1
                return 0, None
            if fault == "enospc_state" and kind == "state":
                self.fault, self.fired = None, self.fired + 1
                return self.rng.randint(1, 20_000), None
            if fault == "enospc_manifest" and kind == "manifest":
                self.fault, self.fired = None, self.fired + 1
                return self.rng.randint(0, 100), None
            if fault == "enospc_latest_pointer" and kind == "latest_pointer":
                self.fault, self.fired = None, self.fired + 1
                return 0, None
            if fault == "short_writes" and kind == "state":
                self.fault, self.fired = None, self.fired + 1
                return None, 4096
        return None, None

    def write(self, fd: int, data: Any) -> int:
        """``os.write``: writes what the simulated disk lets through, as the kernel would."""
        with self.lock:
            file = self.files.get(fd)
        if file is None:
            return os.write(fd, data)
        view = memoryview(data).cast("B")
        size = len(view)
        if file.most is not None and size > 1:
            size = self.rng.randint(1, min(size, file.most))
            with self.lock:
                self.short_writes += size < len(view)
        if file.left is not None:
            if file.left == 0 and size:
                pointer = _kind(file.path) == "latest_pointer"
                target = file.path.name if pointer else file.path.parent.name
                with self.lock:
                    if target not in self.failed_writes:
                        self.failed_writes.add(target)
                        self.bytes_before_enospc.append(file.written)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            size = min(size, file.left)  # what fits is written: a short write, then ENOSPC
            file.left -= size
        written = os.write(fd, view[:size])
        file.written += written
        return written

    def fsync(self, fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        if self.watched(path) and _kind(path) == "state":
            with self.lock:
                if self.fault == "fsync_eio":
                    self.fault, self.fired = None, self.fired + 1
                    self.failed_writes.add(path.parent.name)
                    raise OSError(errno.EIO, os.strerror(errno.EIO))
        os.fsync(fd)


@dataclass
class _FileBudget:
    """How much more one open checkpoint file may take (None: no limit)."""

    path: Path
    left: int | None
    most: int | None
    written: int = 0


def _checkpoint_outcomes(client: TrainbusClient, job_id: str, after: int) -> list[dict[str, Any]]:
    """Checkpoints saved and checkpoint writes that failed, after seq ``after``."""
    events = client.events(
        job_id, after_seq=after, types="checkpoint_saved,subscriber_error", limit=10_000
    )
    return [
        e
        for e in events
        if e["type"] == "checkpoint_saved" or e["data"]["subscriber"] == "checkpoint_writer"
    ]


def _record_names(client: TrainbusClient, job_id: str, checkpoint: str) -> bool:
    return bool(client.job(job_id)["checkpoint"] == checkpoint)


def _pause_and_settle(client: TrainbusClient, job_id: str, after: int) -> list[dict[str, Any]]:
    """Pause the job, wait for the outcome of the save it makes before holding; return the
    checkpoint outcomes (saved or failed) since ``after``. Nothing writes while it holds."""
    client.pause(job_id)
    client.wait(job_id, {"paused"}, timeout=60, interval=0.01)
    outcomes: list[dict[str, Any]] = poll(
        lambda: (
            (found := _checkpoint_outcomes(client, job_id, after))
            and any(e["data"]["reason"] == "pause" for e in found)
            and found
        ),
        "the pause's checkpoint to be written or to fail",
    )
    return outcomes


def _assert_checkpoints_sound(job_dir: Path, latest: str, fault: str) -> None:
    folder = job_dir / "checkpoints"
    unfinished = unfinished_checkpoint_entries(job_dir)
    assert not unfinished, f"{fault}: unfinished checkpoint files left behind: {unfinished}"
    assert verify_checkpoint(job_dir, "latest").name == latest, fault
    state = load_checkpoint(job_dir, "latest")  # verified and torch.load(weights_only=True)
    assert state["model"], fault
    if (folder / "best.json").exists():  # once a checkpoint had the monitored metric
        verify_checkpoint(job_dir, "best")
    for info in list_checkpoints(job_dir):
        verify_checkpoint(job_dir, info.name)  # no partial checkpoint is listed either


def test_disk_full_and_short_writes_never_cost_a_good_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data_dir = tmp_path / "data"
    disk = FaultyDisk(data_dir / "jobs", SEED)
    monkeypatch.setattr(checkpoint_files, "os", disk)
    # the disk is faked in this process: the checkpoint writer runs here, on a thread
    settings = make_settings(data_dir, run_jobs_in="thread")
    started = time.monotonic()
    figures: dict[str, Any] = {}
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
    ):
        job_id = client.submit(SPEC)["id"]
        job_dir = data_dir / "jobs" / job_id
        client.wait(job_id, {"running"}, timeout=60, interval=0.01)
        outcomes = _pause_and_settle(client, job_id, 0)
        assert [e["type"] for e in outcomes][-1] == "checkpoint_saved", outcomes
        latest = outcomes[-1]["data"]["name"]
        _assert_checkpoints_sound(job_dir, latest, "no fault")
        for fault in FAULTS:
            mark = outcomes[-1]["seq"]  # nothing is written while the job holds
            failed_before = len(disk.failed_writes)
            disk.arm(None if fault == "space_returned" else fault)
            client.resume(job_id)
            client.wait(job_id, {"running"}, timeout=60, interval=0.01)
            if fault != "space_returned":
                poll(lambda: disk.fired, f"the {fault} fault to hit a checkpoint write")
            outcomes = _pause_and_settle(client, job_id, mark)
            failures = [e for e in outcomes if e["type"] == "subscriber_error"]
            saved = [e for e in outcomes if e["type"] == "checkpoint_saved"]
            failed_now = len(disk.failed_writes) - failed_before
            assert len(failures) == failed_now, (fault, outcomes)
            if fault in ("short_writes", "space_returned"):
                assert not failures and saved, (fault, outcomes)
                assert fault != "short_writes" or disk.short_writes, "no write was cut short"
            else:
                assert failures, (fault, outcomes)
            cause = CAUSES.get(fault, os.strerror(errno.ENOSPC))
            for outcome in outcomes:  # in the order they happened
                data = outcome["data"]
                if outcome["type"] == "checkpoint_saved":
                    latest = data["name"]
                    continue
                assert data["error_type"] == "OSError", outcome
                assert cause in data["message"], outcome
                assert f"step {data['step']}" in data["message"], outcome
                assert data["latest"] == latest, f"{fault}: the pointer moved: {outcome}"
            _assert_checkpoints_sound(job_dir, latest, fault)
            poll(
                partial(_record_names, client, job_id, latest),
                f"{fault}: the job record to name the latest good checkpoint",
            )
            figures[fault] = {"failed_writes": failed_now, "saved": len(saved)}
        disk.arm(None)
        client.resume(job_id)
        final = client.wait(job_id, timeout=120, interval=0.05)
        assert final["state"] == "completed", final
        errors = client.events(job_id, types="subscriber_error", limit=10_000)
        assert len(errors) == len(disk.failed_writes), errors
        end = verify_checkpoint(job_dir, "latest")
        assert end.reason == "end" and end.step == final["step"], end
        _assert_checkpoints_sound(job_dir, end.name, "after the job")
    record(
        "checkpoint_faults",
        seed=SEED,
        faults=list(FAULTS),
        per_fault=figures,
        failed_writes=len(disk.failed_writes),
        reported=len(errors),
        short_writes=disk.short_writes,
        bytes_before_enospc=disk.bytes_before_enospc,
        final_step=final["step"],
        seconds=round(time.monotonic() - started, 1),
    )


def test_a_best_checkpoint_lost_to_a_full_disk_does_not_raise_the_bar(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With only best checkpoints kept at epoch ends, a best one that fails to write must
    not count as the best: a later epoch that beats what is on disk is saved."""
    disk = FaultyDisk(tmp_path / "jobs", SEED)
    monkeypatch.setattr(checkpoint_files, "os", disk)
    job_dir = tmp_path / "jobs" / "best-only"
    writer = CheckpointWriter(
        job_id="best-only", job_dir=job_dir, bus=None, every_n_epochs=None, keep_best=1
    )
    trainer = ToyTrainer("best-only")
    writer.bind(trainer)

    def end_epoch(epoch: int, val_loss: float, fault: str | None = None) -> None:
        disk.arm(fault)
        trainer.epoch, trainer.step = epoch, 10 * (epoch + 1)
        trainer.metrics = {"val_loss": val_loss}
        trainer.save_reason = "epoch_end"
        trainer.run_callbacks("on_model_save")
        assert writer.flush(timeout=60)

    try:
        end_epoch(0, 1.0)
        end_epoch(1, 0.5, "full")  # the best so far, but the disk is full
        end_epoch(2, 0.7)  # worse than the lost one, better than any on disk
        assert writer.statistics().failed == 1
        best = verify_checkpoint(job_dir, "best")
        assert (best.step, best.monitor_value) == (30, 0.7)
    finally:
        writer.close(timeout=60)
