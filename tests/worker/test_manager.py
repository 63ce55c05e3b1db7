"""The job manager over a real bus, real training threads and a real SQLite file."""

from __future__ import annotations

import gc
import io
import warnings
import weakref
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch
from torch import nn

from trainbus.bus import Event, EventBus, EventType, JobState, Subscriber, Subscription, WouldBlock
from trainbus.worker import (
    IllegalTransition,
    JobHandle,
    JobManager,
    JobNotFound,
    ModelEntry,
    SpecError,
    Trainer,
    default_registry,
)
from trainbus.worker._models import LinearParams
from trainbus.worker._records import JobStore

from .conftest import small_spec

TERMINAL = ["completed", "stopped", "failed", "interrupted"]


def drain(subscription: Subscription) -> list[Event]:
    """Whatever the subscription holds now, without waiting."""
    try:
        return subscription.receive_batch_nowait()
    except WouldBlock:
        return []


async def test_pause_resume_and_stop_a_running_job(bus: EventBus, data_dir: Path) -> None:
    batches = bus.subscribe("batches", types=["train_batch_end"], buffer_size=100_000)
    saves = bus.subscribe("saves", types=["model_save"], buffer_size=100_000)
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        record = await manager.submit(small_spec(epochs=200))
        await batches.receive()
        command = manager.pause(record.id)
        paused = await manager.wait_for(record.id, ["paused"], timeout=30)
        assert command.kind == "pause" and paused.state is JobState.PAUSED
        # Held: a save is honoured while paused, and no batch runs meanwhile.
        drain(batches)
        handle = manager.handle(record.id)
        assert handle is not None
        save = handle.control.save("while paused")
        async for saved in saves:
            if saved.data.get("command_id") == save.id:
                break
        assert drain(batches) == []
        assert manager.get(record.id).state is JobState.PAUSED
        with pytest.raises(IllegalTransition, match="it is paused"):
            manager.pause(record.id)
        await manager.resume(record.id)
        await manager.wait_for(record.id, ["running"], timeout=30)
        manager.stop(record.id, reason="seen enough")
        stopped = await manager.wait_for(record.id, TERMINAL, timeout=30)
    assert stopped.state is JobState.STOPPED
    assert stopped.stop_reason == "seen enough"
    assert 0 < stopped.step < 200 * 8


async def test_queued_jobs_run_in_order_under_the_limit(bus: EventBus, data_dir: Path) -> None:
    lifecycle = bus.subscribe("lifecycle", types=["job_started", "job_completed"])
    async with JobManager(bus=bus, data_dir=data_dir, max_running=1) as manager:
        ids = [(await manager.submit(small_spec(epochs=1))).id for _ in range(3)]
        for job_id in ids:
            await manager.wait_for(job_id, ["completed"], timeout=60)
    events = lifecycle.receive_batch_nowait()
    assert [(e.type.value, e.job_id) for e in events] == [
        (kind, job_id) for job_id in ids for kind in ("job_started", "job_completed")
    ]  # one at a time, first in first out


async def test_a_queued_jobs_record_says_what_it_waits_for(bus: EventBus, data_dir: Path) -> None:
    async with JobManager(bus=bus, data_dir=data_dir, max_running=1) as manager:
        first = await manager.submit(small_spec(epochs=50))
        await manager.wait_for(first.id, ["running"], timeout=60)
        manager.pause(first.id)
        await manager.wait_for(first.id, ["paused"], timeout=60)
        second = await manager.submit(small_spec(epochs=1))
        waiting = manager.get(second.id)
        assert waiting.state is JobState.QUEUED
        assert waiting.waiting_for is not None
        assert "1 of 1 in use" in waiting.waiting_for and first.id in waiting.waiting_for
        assert "paused job keeps its slot" in waiting.waiting_for
        listed = {record.id: record for record in manager.list()[0]}
        assert listed[second.id].waiting_for == waiting.waiting_for
        assert manager.get(first.id).waiting_for is None
        manager.stop(first.id)
        done = await manager.wait_for(second.id, ["completed"], timeout=60)
        assert done.waiting_for is None


async def test_illegal_requests_say_what_the_state_allows(bus: EventBus, data_dir: Path) -> None:
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        record = await manager.submit(small_spec(epochs=1))
        done = await manager.wait_for(record.id, TERMINAL, timeout=60)
        assert done.state is JobState.COMPLETED and done.epoch == 1
        with pytest.raises(IllegalTransition, match="completed"):
            await manager.resume(record.id)
        with pytest.raises(IllegalTransition):
            manager.stop(record.id)
        with pytest.raises(IllegalTransition, match="allowed when the job is running"):
            manager.pause(record.id)
        with pytest.raises(JobNotFound):
            manager.get("no-such-job")
        await manager.delete(record.id)
        with pytest.raises(JobNotFound):
            manager.get(record.id)
        assert not (data_dir / "jobs" / record.id).exists()


async def test_a_queued_job_can_be_stopped_before_it_starts(bus: EventBus, data_dir: Path) -> None:
    async with JobManager(bus=bus, data_dir=data_dir, max_running=1) as manager:
        first = await manager.submit(small_spec(epochs=100))
        second = await manager.submit(small_spec(epochs=1))
        manager.stop(second.id, reason="changed my mind")
        assert manager.get(second.id).state is JobState.STOPPED
        manager.stop(first.id)
        await manager.wait_for(first.id, TERMINAL, timeout=30)


class StateKeeper(Subscriber):
    """A minimal in-memory checkpoint: the trainer state at each save, as bytes."""

    saved: dict[str, bytes] = {}

    def __init__(self, handle: JobHandle) -> None:
        self.job_id = handle.id
        assert handle.trainer is not None
        handle.trainer.add_callback("on_model_save", self._save)

    def _save(self, trainer: Any) -> None:
        buffer = io.BytesIO()
        torch.save(trainer.state_dict(), buffer)
        StateKeeper.saved[trainer.job_id] = buffer.getvalue()

    async def on_event(self, event: Event) -> None:
        pass


def load_kept(job_id: str, job_dir: Path) -> dict[str, Any] | None:
    raw = StateKeeper.saved.get(job_id)
    return None if raw is None else torch.load(io.BytesIO(raw), weights_only=True)


async def test_a_job_left_running_by_a_dead_server_comes_back_interrupted_and_resumes_exactly(
    bus: EventBus, data_dir: Path
) -> None:
    spec = small_spec(epochs=3)
    steps = bus.subscribe("steps", types=["train_batch_end"])
    async with JobManager(
        bus=bus, data_dir=data_dir, subscriber_factory=lambda h: [StateKeeper(h)]
    ) as manager:
        victim = await manager.submit(spec)
        async for event in steps:
            if event.job_id == victim.id and event.data["step"] == 11:
                break
        manager.stop(victim.id)
        await manager.wait_for(victim.id, ["stopped"], timeout=30)
    # The process "dies" before the record saw an epoch end: it still says running, step 0.
    store = JobStore(data_dir / "trainbus.db")
    store.update(victim.id, state=JobState.RUNNING, epoch=0, step=0, metrics={})
    store.close()

    lifecycle = bus.subscribe("lifecycle", job_id=victim.id)
    async with JobManager(
        bus=bus,
        data_dir=data_dir,
        subscriber_factory=lambda h: [StateKeeper(h)],
        checkpoint_loader=load_kept,
    ) as manager:
        assert manager.get(victim.id).state is JobState.INTERRUPTED
        assert (await lifecycle.receive()).type is EventType.JOB_INTERRUPTED
        await manager.resume(victim.id)
        done = await manager.wait_for(victim.id, TERMINAL, timeout=60)
        assert done.state is JobState.COMPLETED
        assert done.step == 3 * 8
        finished = load_kept(victim.id, data_dir)
    assert finished is not None
    # Same weights as the run that was never interrupted: compare with a fresh reference.
    async with JobManager(
        bus=bus, data_dir=data_dir, subscriber_factory=lambda h: [StateKeeper(h)]
    ) as manager:
        again = await manager.submit(spec)
        await manager.wait_for(again.id, ["completed"], timeout=60)
    expected = load_kept(again.id, data_dir)
    assert expected is not None
    for name, value in expected["model"].items():
        assert torch.equal(value, finished["model"][name]), name


class Exploding(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.layer = nn.Linear(in_features, out_features)
        self.calls = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls > 3:
            raise RuntimeError("the GPU caught fire (simulated)")
        return self.layer(inputs)  # type: ignore[no-any-return]


async def test_a_failing_job_is_recorded_and_other_jobs_carry_on(
    bus: EventBus, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        default_registry().models,
        "exploding",
        ModelEntry("exploding", LinearParams, lambda p, i, o: Exploding(i, o)),
    )
    failures = bus.subscribe("failures", types=["job_failed"])
    async with JobManager(bus=bus, data_dir=data_dir, max_running=2) as manager:
        bad = await manager.submit(small_spec(model={"name": "exploding"}))
        good = await manager.submit(small_spec(epochs=2))
        failed = await manager.wait_for(bad.id, TERMINAL, timeout=60)
        completed = await manager.wait_for(good.id, TERMINAL, timeout=60)
    assert failed.state is JobState.FAILED
    assert failed.error is not None
    assert failed.error.type == "RuntimeError" and "caught fire" in failed.error.message
    assert completed.state is JobState.COMPLETED
    (event,) = failures.receive_batch_nowait()
    assert event.data["error"]["type"] == "RuntimeError"


async def test_records_survive_a_restart_and_list_paginates(bus: EventBus, data_dir: Path) -> None:
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        ids = [(await manager.submit(small_spec(epochs=1, name=f"job {i}"))).id for i in range(3)]
        for job_id in ids:
            await manager.wait_for(job_id, TERMINAL, timeout=60)
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        page, total = manager.list(offset=1, limit=1)
        assert total == 3 and [r.id for r in page] == ids[1:2]
        assert page[0].name == "job 1" and page[0].metrics["val_accuracy"] > 0
        assert manager.list(state="completed")[1] == 3
        assert manager.list(state="running")[1] == 0
        with pytest.raises(SpecError, match="unknown job state 'bogus'; states: queued"):
            manager.list(state="bogus")


class StopAt(Subscriber):
    """Stops its job once, at a given step (a batch boundary), through the control channel."""

    def __init__(self, handle: JobHandle, at_step: int) -> None:
        self.job_id = handle.id
        self.at_step = at_step
        assert handle.trainer is not None
        handle.trainer.add_callback("on_train_batch_end", self._check)

    def _check(self, trainer: Any) -> None:
        if trainer.step == self.at_step:
            trainer.control.stop("interrupt for the test", source="test")

    async def on_event(self, event: Event) -> None:
        pass


async def test_a_stopped_job_resumes_exactly_without_checkpoints(
    bus: EventBus, data_dir: Path
) -> None:
    spec = small_spec(epochs=2, checkpoint={"enabled": False})
    runs: dict[str, int] = {}

    def factory(handle: JobHandle) -> list[Subscriber]:
        runs[handle.id] = runs.get(handle.id, 0) + 1
        keeper = StateKeeper(handle)
        return [keeper, StopAt(handle, 5)] if runs[handle.id] == 1 else [keeper]

    async with JobManager(bus=bus, data_dir=data_dir, subscriber_factory=factory) as manager:
        interrupted = await manager.submit(spec)
        stopped = await manager.wait_for(interrupted.id, TERMINAL, timeout=60)
        assert stopped.state is JobState.STOPPED and stopped.step == 5
        assert stopped.stop_reason == "interrupt for the test"
        await manager.resume(interrupted.id)
        done = await manager.wait_for(interrupted.id, ["completed", "failed"], timeout=60)
        assert done.state is JobState.COMPLETED and done.step == 2 * 8
        reference = await manager.submit(spec)
        runs[reference.id] = 1_000  # no StopAt
        await manager.wait_for(reference.id, ["completed"], timeout=60)
    resumed_state = load_kept(interrupted.id, data_dir)
    reference_state = load_kept(reference.id, data_dir)
    assert resumed_state is not None and reference_state is not None
    for name, value in reference_state["model"].items():
        assert torch.equal(value, resumed_state["model"][name]), name
    for key, values in reference_state["optimizer"]["state"].items():
        for field, value in values.items():
            assert torch.equal(value, resumed_state["optimizer"]["state"][key][field]), field


async def test_a_stored_spec_that_no_longer_validates_fails_only_its_job(
    bus: EventBus, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(
        default_registry().models,
        "vanishing",
        ModelEntry("vanishing", LinearParams, lambda p, i, o: nn.Linear(i, o)),
    )
    async with JobManager(bus=bus, data_dir=data_dir, max_running=1) as manager:
        blocker = await manager.submit(small_spec(epochs=200))
        doomed = await manager.submit(small_spec(model={"name": "vanishing"}))
        del default_registry().models["vanishing"]  # the plugin was uninstalled meanwhile
        manager.stop(blocker.id)
        failed = await manager.wait_for(doomed.id, TERMINAL, timeout=60)
        assert failed.state is JobState.FAILED and failed.error is not None
        assert "unknown model 'vanishing'" in failed.error.message
        healthy = await manager.submit(small_spec(epochs=1))
        assert (await manager.wait_for(healthy.id, TERMINAL, timeout=60)).state == "completed"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a server without CUDA")
async def test_a_cuda_job_is_refused_at_submission_on_a_cpu_server(
    bus: EventBus, data_dir: Path
) -> None:
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        with pytest.raises(SpecError, match="no CUDA"):
            await manager.submit(small_spec(device="cuda"))
        with pytest.raises(SpecError, match="fp16"):
            await manager.submit(small_spec(precision="fp16"))
        assert manager.list()[1] == 0


async def test_shutdown_saves_and_pauses_running_jobs_which_come_back_interrupted(
    bus: EventBus, data_dir: Path
) -> None:
    watch = bus.subscribe(
        "watch",
        types=["train_batch_end", "model_save", "job_interrupted", "job_completed"],
        buffer_size=100_000,
    )
    async with JobManager(
        bus=bus, data_dir=data_dir, subscriber_factory=lambda h: [StateKeeper(h)]
    ) as manager:
        record = await manager.submit(small_spec(epochs=200))
        while (await watch.receive()).type is not EventType.TRAIN_BATCH_END:
            pass
        await manager.shutdown(timeout=30)
        interrupted = manager.get(record.id)
    assert interrupted.state is JobState.INTERRUPTED
    seen = [e for e in watch.receive_batch_nowait() if e.type is not EventType.TRAIN_BATCH_END]
    assert [e.type for e in seen][-2:] == [EventType.MODEL_SAVE, EventType.JOB_INTERRUPTED]
    assert seen[-2].data["reason"] == "shutdown"
    saved_step = seen[-2].data["step"]
    async with JobManager(
        bus=bus,
        data_dir=data_dir,
        subscriber_factory=lambda h: [StateKeeper(h)],
        checkpoint_loader=load_kept,
    ) as manager:
        assert manager.get(record.id).state is JobState.INTERRUPTED
        await manager.resume(record.id)
        restarted = await watch.receive()
        while restarted.type is not EventType.TRAIN_BATCH_END:
            restarted = await watch.receive()
        assert restarted.data["step"] == saved_step + 1  # continued, not started over
        manager.stop(record.id)
        assert (await manager.wait_for(record.id, TERMINAL, timeout=30)).state == "stopped"


async def test_a_stop_from_a_controller_completes_the_job_with_its_reason(
    bus: EventBus, data_dir: Path
) -> None:
    batches = bus.subscribe("batches", types=["train_batch_end"])
    async with JobManager(bus=bus, data_dir=data_dir) as manager:
        record = await manager.submit(small_spec(epochs=200))
        await batches.receive()
        manager.stop(record.id, reason="val_loss stopped improving", source="early_stop")
        done = await manager.wait_for(record.id, TERMINAL, timeout=30)
    assert done.state is JobState.COMPLETED
    assert done.stop_reason == "val_loss stopped improving"


async def test_a_resume_during_the_end_of_a_run_keeps_the_concurrency_limit(
    bus: EventBus, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with JobManager(bus=bus, data_dir=data_dir, max_running=2) as manager:
        x = await manager.submit(small_spec(epochs=200))
        await manager.wait_for(x.id, ["running"], timeout=30)
        # X's stop is stored, then held while it is published: X is resumed meanwhile
        reached, release, published = anyio.Event(), anyio.Event(), anyio.Event()
        publish_async = bus.publish_async

        async def held(job_id: str, event_type: Any, data: Any = None) -> Event:
            if job_id != x.id or event_type is not EventType.JOB_STOPPED or release.is_set():
                return await publish_async(job_id, event_type, data)
            reached.set()
            await release.wait()
            event = await publish_async(job_id, event_type, data)
            published.set()
            return event

        monkeypatch.setattr(bus, "publish_async", held)
        manager.stop(x.id)
        with anyio.fail_after(30):
            await reached.wait()
        await manager.resume(x.id)
        await manager.wait_for(x.id, ["running"], timeout=30)
        y = await manager.submit(small_spec(epochs=200))
        await manager.wait_for(y.id, ["running"], timeout=30)
        release.set()
        with anyio.fail_after(30):
            await published.wait()  # the first run of X has ended
        z = await manager.submit(small_spec(epochs=1))
        manager.stop(y.id)
        await manager.wait_for(z.id, ["running", "completed"], timeout=30)
        manager.stop(x.id)
        await manager.wait_for(x.id, ["stopped"], timeout=30)
        y_ended, z_started = manager.get(y.id).ended_at, manager.get(z.id).started_at
    # Z starts only once Y's end freed a slot (X's new run holds the other)
    assert y_ended is not None and z_started is not None and z_started >= y_ended


async def test_a_failed_restore_keeps_the_progress_and_the_job_resumes_once_fixed(
    bus: EventBus, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = small_spec(epochs=3, checkpoint={"enabled": False})
    runs: dict[str, int] = {}

    def factory(handle: JobHandle) -> list[Subscriber]:
        runs[handle.id] = runs.get(handle.id, 0) + 1
        return [StopAt(handle, 13)] if runs[handle.id] == 1 else []

    async with JobManager(bus=bus, data_dir=data_dir, subscriber_factory=factory) as manager:
        job = await manager.submit(spec)
        stopped = await manager.wait_for(job.id, TERMINAL, timeout=60)
        assert stopped.state is JobState.STOPPED and stopped.step == 13
        assert stopped.epoch == 1 and stopped.metrics

        def broken(self: Any, state: Any) -> None:
            raise RuntimeError("size mismatch for model.0.weight (simulated)")

        with monkeypatch.context() as patch:
            patch.setattr(Trainer, "load_state_dict", broken)
            await manager.resume(job.id)
            failed = await manager.wait_for(job.id, ["failed"], timeout=60)
        assert failed.error is not None and "size mismatch" in failed.error.message
        assert (failed.epoch, failed.step, failed.metrics) == (1, 13, stopped.metrics)
        await manager.resume(job.id)  # the cause is fixed
        done = await manager.wait_for(job.id, ["completed", "failed"], timeout=60)
        assert done.state is JobState.COMPLETED and done.step == 3 * 8 and done.error is None
        reference = await manager.submit(spec)
        runs[reference.id] = 1_000  # no StopAt
        await manager.wait_for(reference.id, ["completed"], timeout=60)
        expected = manager.get(reference.id).metrics
    for name in ("train_loss", "val_loss", "val_accuracy"):
        assert done.metrics[name] == expected[name], name  # continued exactly


def tensors_sharing(storages: list[torch.UntypedStorage]) -> int:
    """How many tensors alive in the process view the memory of ``storages``."""
    gc.collect()
    pointers = {storage.data_ptr() for storage in storages}
    with warnings.catch_warnings():  # isinstance on some deprecated torch objects warns
        warnings.simplefilter("ignore")
        return sum(
            1
            for o in gc.get_objects()
            if isinstance(o, torch.Tensor) and o.untyped_storage().data_ptr() in pointers
        )


async def test_jobs_that_are_not_running_hold_no_tensors(bus: EventBus, data_dir: Path) -> None:
    models: list[weakref.ref[nn.Module]] = []
    storages: list[torch.UntypedStorage] = []  # keeps the memory, so that no one else gets it

    def factory(handle: JobHandle) -> list[Subscriber]:
        assert handle.trainer is not None
        models.append(weakref.ref(handle.trainer.model))
        storages.extend(p.untyped_storage() for p in handle.trainer.model.parameters())
        return [StopAt(handle, 5)]

    async with JobManager(bus=bus, data_dir=data_dir, subscriber_factory=factory) as manager:
        ids = []
        for _ in range(3):
            job = await manager.submit(small_spec(epochs=2, checkpoint={"enabled": False}))
            assert (await manager.wait_for(job.id, TERMINAL, timeout=60)).state == "stopped"
            ids.append(job.id)
        assert tensors_sharing(storages) == 0
        assert [model() for model in models] == [None] * 3
        for job_id in ids:
            await manager.delete(job_id)
        assert tensors_sharing(storages) == 0
