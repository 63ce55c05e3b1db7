"""The events a worker that lost its server kept in the job's folder: the next server publishes
each once, after what its store holds, only once the worker has ended, and sets aside a file
it cannot read (``worker/_unconfirmed.py``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import pytest

from trainbus.bus import EventBus, EventType
from trainbus.sdk import encode
from trainbus.subscribers import EventStore
from trainbus.worker import WorkerSupervisor
from trainbus.worker._unconfirmed import (
    UNCONFIRMED_FILE,
    hold_worker_lock,
    write_unconfirmed,
)

pytestmark = pytest.mark.anyio

JOB = "job-kept"
WORKER = "0123456789abcdef"


def _batch(step: int) -> list[Any]:
    return [
        "train_batch_end",
        1_700_000_000.0 + step,
        {"epoch": 0, "batch": step - 1, "step": step},
    ]


def _kept(first: int, steps: list[int], **progress: int) -> list[str]:
    header = {"type": "unconfirmed", "protocol": 1, "job_id": JOB, "worker": WORKER, **progress}
    events = {"type": "events", "first": first, "events": [_batch(step) for step in steps]}
    return [encode(header), encode(events)]


async def _stored_steps(store: EventStore, bus: EventBus) -> list[int]:
    with anyio.fail_after(10):
        await store.wait_handled(JOB, bus.last_seq(JOB))
    events = await anyio.to_thread.run_sync(store.read, JOB)
    return [e.data["step"] for e in events if e.type is EventType.TRAIN_BATCH_END]


async def test_kept_events_are_stored_once_after_what_the_store_holds(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    async with EventBus() as bus:
        store = EventStore(tmp_path / "events.db")
        bus.attach(store)
        supervisor = WorkerSupervisor(
            bus=bus, processes=None, url_for=str, data_dir=tmp_path, mark_of=store.worker_mark
        )
        # the dead server had stored the worker's first two events (its mark says so) but
        # not acknowledged them: the worker kept all four
        held = bus.publish_many(JOB, [(EventType.TRAIN_BATCH_END, _batch(s)[2]) for s in (1, 2)])
        await anyio.to_thread.run_sync(bus.wait_processed, held[-1], 10)
        await anyio.to_thread.run_sync(store.mark_worker, JOB, held[-1].seq, WORKER, 2)
        write_unconfirmed(job_dir, _kept(1, [1, 2, 3, 4], step=4, epoch=0))

        assert await supervisor.take_unconfirmed(JOB, job_dir) == {"step": 4}
        assert await _stored_steps(store, bus) == [1, 2, 3, 4]
        assert not (job_dir / UNCONFIRMED_FILE).exists()
        assert await supervisor.take_unconfirmed(JOB, job_dir) == {}  # nothing twice


async def test_the_next_server_reads_them_only_once_the_worker_has_ended(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    lock = hold_worker_lock(job_dir)  # as the worker holds it for its whole life
    assert lock is not None
    async with EventBus() as bus:
        store = EventStore(tmp_path / "events.db")
        bus.attach(store)
        supervisor = WorkerSupervisor(
            bus=bus, processes=None, url_for=str, data_dir=tmp_path, mark_of=store.worker_mark
        )
        taken: list[dict[str, Any]] = []
        async with anyio.create_task_group() as group:
            group.start_soon(lambda: _take(supervisor, job_dir, taken))
            await anyio.sleep(0.3)
            write_unconfirmed(job_dir, _kept(1, [1, 2], step=2))  # its last act
            assert not taken  # it waits for the lock, not for the file
            os.close(lock)  # the worker's process ends
        assert taken == [{"step": 2}]
        assert await _stored_steps(store, bus) == [1, 2]


async def _take(supervisor: WorkerSupervisor, job_dir: Path, taken: list[dict[str, Any]]) -> None:
    taken.append(await supervisor.take_unconfirmed(JOB, job_dir))


async def test_an_unreadable_file_is_set_aside_and_the_job_goes_on(tmp_path: Path) -> None:
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    write_unconfirmed(job_dir, [encode({"type": "unconfirmed", "job_id": "another"}), "{"])
    async with EventBus() as bus:
        supervisor = WorkerSupervisor(bus=bus, processes=None, url_for=str, data_dir=tmp_path)
        assert await supervisor.take_unconfirmed(JOB, job_dir) == {}
    assert not (job_dir / UNCONFIRMED_FILE).exists()
    assert (job_dir / "unconfirmed-events.unreadable.jsonl").exists()
