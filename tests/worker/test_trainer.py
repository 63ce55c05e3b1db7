"""The Trainer on real data: accuracy, the event vocabulary, control, exact resume."""

from __future__ import annotations

import io
import threading
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from trainbus.bus import ControlChannel, Event, EventBus, EventType
from trainbus.worker import JobSpec, Outcome, RunResult, Trainer
from trainbus.worker._threads import torch_threads

from .conftest import small_spec


def make_trainer(
    bus: EventBus,
    data_dir: Path,
    spec: dict[str, Any],
    job_id: str = "job",
    *,
    shares_process: bool = False,
) -> Trainer:
    return Trainer(
        job_id=job_id,
        spec=JobSpec.model_validate(spec),
        bus=bus,
        control=ControlChannel(job_id, publish=bus.publish),
        data_dir=data_dir,
        shares_process=shares_process,
    )


async def test_digits_reaches_ninety_percent_validation_accuracy(
    bus: EventBus, data_dir: Path
) -> None:
    spec = {
        "model": {"name": "mlp", "params": {"hidden_sizes": [64]}},
        "dataset": {"name": "digits"},
        "epochs": 4,
        "batch_size": 32,
        "optimizer": {"name": "adam", "lr": 0.003},
        "batch_event_every": 10,
    }
    trainer = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, spec)
    result = await anyio.to_thread.run_sync(trainer.run)
    assert result.outcome is Outcome.COMPLETED
    assert trainer.metrics["val_accuracy"] >= 0.9
    assert trainer.metrics["samples_per_s"] > 0


async def test_a_two_epoch_run_publishes_the_vocabulary_in_order(
    bus: EventBus, data_dir: Path
) -> None:
    subscription = bus.subscribe("all", buffer_size=100_000)
    spec = small_spec(epochs=2, batch_size=64)  # iris: 120 train -> 2 batches, 30 val -> 1
    trainer = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, spec)
    await anyio.to_thread.run_sync(trainer.run)
    types = [e.type.value for e in subscription.receive_batch_nowait()]
    batch = ["train_batch_start", "optimizer_step", "before_zero_grad", "train_batch_end"]
    epoch = [
        "train_epoch_start", *batch, *batch, "train_epoch_end",
        "val_start", "val_batch_start", "val_batch_end", "val_end",
        "fit_epoch_end", "params_update",
    ]  # fmt: skip
    assert types == [
        "pretrain_routine_start", "pretrain_routine_end", "train_start",
        *epoch, "model_save",  # the saved state is the stepped one
        *epoch, "model_save",  # the last epoch's save is the run's end save
        "train_end", "teardown",
    ]  # fmt: skip


async def test_batch_event_every_thins_only_batch_level_events(
    bus: EventBus, data_dir: Path
) -> None:
    subscription = bus.subscribe("all", buffer_size=100_000)
    trainer = await anyio.to_thread.run_sync(
        make_trainer, bus, data_dir, small_spec(epochs=1, batch_event_every=4)
    )
    await anyio.to_thread.run_sync(trainer.run)
    events = subscription.receive_batch_nowait()
    batch_ends = [e.data["batch"] for e in events if e.type is EventType.TRAIN_BATCH_END]
    assert batch_ends == [0, 4]
    assert sum(e.type is EventType.FIT_EPOCH_END for e in events) == 1
    payload = next(e for e in events if e.type is EventType.TRAIN_BATCH_END).data
    assert set(payload) >= {"epoch", "batch", "step", "loss", "lr"}


async def test_a_raising_callback_is_reported_not_fatal(bus: EventBus, data_dir: Path) -> None:
    subscription = bus.subscribe("errors", types=[EventType.SUBSCRIBER_ERROR])
    trainer = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, small_spec(epochs=1))

    def broken(trainer: Trainer) -> None:
        raise RuntimeError("callback bug")

    trainer.add_callback("on_fit_epoch_end", broken)
    result = await anyio.to_thread.run_sync(trainer.run)
    assert result.outcome is Outcome.COMPLETED
    (report,) = subscription.receive_batch_nowait()
    assert report.data["callback"] == "on_fit_epoch_end"
    assert report.data["message"] == "callback bug"


async def test_non_finite_loss_fails_or_stops_as_configured(bus: EventBus, data_dir: Path) -> None:
    spec = small_spec(epochs=2, optimizer={"name": "sgd", "lr": 10.0, "momentum": 0.99})
    spec["model"] = {"name": "linear"}
    spec["dataset"] = {"name": "synthetic_regression", "params": {"n_samples": 200, "noise": 10}}
    failing = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, spec)
    result = await anyio.to_thread.run_sync(failing.run)
    assert result.outcome is Outcome.FAILED
    assert result.error is not None and "non-finite loss" in result.error["message"]
    stopping = await anyio.to_thread.run_sync(
        make_trainer, bus, data_dir, {**spec, "nonfinite_loss": "stop"}
    )
    result = await anyio.to_thread.run_sync(stopping.run)
    assert result.outcome is Outcome.STOPPED
    assert result.stop_reason is not None and "non-finite loss" in result.stop_reason


def train_uninterrupted(bus: EventBus, data_dir: Path, spec: dict[str, Any]) -> Trainer:
    trainer = make_trainer(bus, data_dir, spec)
    assert trainer.run().outcome is Outcome.COMPLETED
    return trainer


def train_interrupted(bus: EventBus, data_dir: Path, spec: dict[str, Any], at_step: int) -> Trainer:
    """Stop at ``at_step`` (a batch boundary), round-trip the state through torch.save and
    torch.load(weights_only=True) into a new trainer, and finish there."""
    first = make_trainer(bus, data_dir, spec, job_id="interrupted")

    def stop_here(trainer: Trainer) -> None:
        if trainer.step == at_step:
            trainer.control.stop("interrupt for the test")

    first.add_callback("on_train_batch_end", stop_here)
    assert first.run().outcome is Outcome.STOPPED
    assert first.step == at_step
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    second = make_trainer(bus, data_dir, spec, job_id="interrupted")
    second.load_state_dict(state)
    assert second.run().outcome is Outcome.COMPLETED
    return second


def assert_same_training_state(a: Trainer, b: Trainer) -> None:
    for (name, left), right in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(left, right), name
    left_state = a.optimizer.state_dict()["state"]
    right_state = b.optimizer.state_dict()["state"]
    assert left_state.keys() == right_state.keys()
    for key in left_state:
        for field, value in left_state[key].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(right_state[key][field])), (
                field
            )
    assert a.step == b.step

    def learned(metrics: dict[str, float]) -> dict[str, float]:
        return {k: v for k, v in metrics.items() if k not in ("epoch_seconds", "samples_per_s")}

    assert learned(a.metrics) == learned(b.metrics)


@pytest.mark.parametrize("at_step", [1, 5, 8, 13, 20])  # 8 batches per epoch: 8 is an epoch end
async def test_exact_resume_at_any_batch_boundary(
    bus: EventBus, data_dir: Path, at_step: int
) -> None:
    spec = small_spec()
    reference = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec)
    resumed = await anyio.to_thread.run_sync(train_interrupted, bus, data_dir, spec, at_step)
    assert_same_training_state(reference, resumed)


def train_from_epoch_end_save(bus: EventBus, data_dir: Path, spec: dict[str, Any]) -> Trainer:
    """Resume from the state a checkpoint writer snapshots at the first epoch's end (the
    ``on_model_save`` callback with ``save_reason == "epoch_end"``)."""
    first = make_trainer(bus, data_dir, spec, job_id="from-epoch-end")
    saved: list[bytes] = []

    def snapshot(trainer: Trainer) -> None:
        if trainer.save_reason == "epoch_end" and not saved:
            buffer = io.BytesIO()
            torch.save(trainer.state_dict(), buffer)
            saved.append(buffer.getvalue())

    first.add_callback("on_model_save", snapshot)
    assert first.run().outcome is Outcome.COMPLETED
    second = make_trainer(bus, data_dir, spec, job_id="from-epoch-end")
    second.load_state_dict(torch.load(io.BytesIO(saved[0]), weights_only=True))
    assert second.run().outcome is Outcome.COMPLETED
    return second


async def test_exact_resume_from_the_checkpoint_taken_at_an_epoch_end(
    bus: EventBus, data_dir: Path
) -> None:
    # the step scheduler (gamma 0.9 each epoch) must have stepped in the saved state
    spec = small_spec()
    reference = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec)
    resumed = await anyio.to_thread.run_sync(train_from_epoch_end_save, bus, data_dir, spec)
    assert_same_training_state(reference, resumed)
    assert resumed.lr == reference.lr


async def test_exact_resume_with_adamw_and_onecycle(bus: EventBus, data_dir: Path) -> None:
    spec = small_spec(
        optimizer={"name": "adamw", "lr": 0.01, "weight_decay": 0.01},
        scheduler={"name": "onecycle"},
    )
    reference = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec)
    resumed = await anyio.to_thread.run_sync(train_interrupted, bus, data_dir, spec, 11)
    assert_same_training_state(reference, resumed)


async def test_commands_pause_set_lr_save_and_stop_at_batch_boundaries(
    bus: EventBus, data_dir: Path
) -> None:
    audit = bus.subscribe(
        "audit", types=["job_paused", "lr_changed", "model_save", "job_resumed", "job_stopping"]
    )
    batches = bus.subscribe("batches", types=["train_batch_end"])

    async def next_command_event() -> Event:
        """The next audit event a command caused: epoch-end saves come whenever an epoch ends
        (on a loaded machine the trainer may pass an epoch end before the pause arrives)."""
        event = await audit.receive()
        while event.type is EventType.MODEL_SAVE and event.data["reason"] == "epoch_end":
            event = await audit.receive()
        return event

    trainer = await anyio.to_thread.run_sync(make_trainer, bus, data_dir, small_spec(epochs=50))
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.to_thread.run_sync, trainer.run)
        try:
            await batches.receive()
            pause = trainer.control.pause("look")
            paused = await next_command_event()
            assert paused.type is EventType.JOB_PAUSED and paused.data["command_id"] == pause.id
            saved = await next_command_event()  # a pause saves first
            assert saved.type is EventType.MODEL_SAVE and saved.data["reason"] == "pause"
            held_at = trainer.step
            trainer.control.set_lr(0.001)
            changed = await next_command_event()
            assert changed.type is EventType.LR_CHANGED and changed.data["lr"] == 0.001
            trainer.control.save("now")
            saved = await next_command_event()
            assert saved.data["save_reason"] == "command" and saved.data["reason"] == "now"
            assert trainer.step == held_at  # nothing trained while paused
            trainer.control.resume()
            assert (await next_command_event()).type is EventType.JOB_RESUMED
            after = await batches.receive()
            while after.data["step"] <= held_at:  # batch events from before the pause
                after = await batches.receive()
            assert after.data["lr"] == pytest.approx(0.001)
            trainer.control.stop("done", source="user")
            following = await next_command_event()
            while following.type is EventType.MODEL_SAVE:  # the stop's own save may come first
                following = await next_command_event()
            assert following.type is EventType.JOB_STOPPING
        finally:  # a failed assertion must not leave the training thread paused for ever
            trainer.control.stop("test over", source="user")
    assert trainer.epoch < 49


async def test_inline_callbacks_run_at_every_batch_even_when_events_are_thinned(
    bus: EventBus, data_dir: Path
) -> None:
    trainer = await anyio.to_thread.run_sync(
        make_trainer, bus, data_dir, small_spec(epochs=1, batch_event_every=100)
    )
    calls: dict[str, list[int]] = {}
    for name in (
        "on_train_batch_start",
        "on_optimizer_step",
        "on_before_zero_grad",
        "on_train_batch_end",
        "on_val_batch_start",
        "on_val_batch_end",
    ):
        trainer.add_callback(name, lambda t, name=name: calls.setdefault(name, []).append(t.step))
    assert (await anyio.to_thread.run_sync(trainer.run)).outcome is Outcome.COMPLETED
    assert calls["on_train_batch_start"] == list(range(8))
    assert calls["on_optimizer_step"] == calls["on_train_batch_end"] == list(range(1, 9))
    assert calls["on_before_zero_grad"] == list(range(1, 9))
    assert len(calls["on_val_batch_start"]) == len(calls["on_val_batch_end"]) == 2  # 30 / 16


async def test_bf16_mixed_precision_runs_on_the_cpu(bus: EventBus, data_dir: Path) -> None:
    trainer = await anyio.to_thread.run_sync(
        make_trainer, bus, data_dir, small_spec(epochs=1, precision="bf16")
    )
    assert trainer.autocast_dtype is torch.bfloat16 and not trainer.scaler.is_enabled()
    result = await anyio.to_thread.run_sync(trainer.run)
    assert result.outcome is Outcome.COMPLETED
    assert trainer.metrics["val_loss"] == trainer.metrics["val_loss"]  # not NaN


def pause_after_the_last_epoch_and_resume(
    bus: EventBus, data_dir: Path, spec: dict[str, Any]
) -> tuple[Trainer, Trainer]:
    reference = make_trainer(bus, data_dir, spec, job_id="reference")
    assert reference.run().outcome is Outcome.COMPLETED
    # paused at the boundary after the last fit_epoch_end, then the server shut down
    first = make_trainer(bus, data_dir, spec, job_id="resumed")
    first.add_callback(
        "on_fit_epoch_end", lambda t: t.control.pause("at the end") if t.epoch == 1 else None
    )
    first.add_callback(
        "on_model_save", lambda t: t.control.close() if t.save_reason == "pause" else None
    )
    assert first.run().outcome is Outcome.INTERRUPTED
    state = first.state_dict()
    second = make_trainer(bus, data_dir, spec, job_id="resumed")
    second.load_state_dict(state)
    assert second.run().outcome is Outcome.COMPLETED
    return reference, second


async def test_a_run_resumed_after_its_last_epoch_end_ends_at_that_epoch(
    bus: EventBus, data_dir: Path
) -> None:
    ends = bus.subscribe("ends", types=["model_save", "train_end"], buffer_size=1_000)
    reference, resumed = await anyio.to_thread.run_sync(
        pause_after_the_last_epoch_and_resume, bus, data_dir, small_spec(epochs=2)
    )
    seen: dict[str, list[tuple[str, str, int, int]]] = {"reference": [], "resumed": []}
    for e in ends.receive_batch_nowait():
        reason = str(e.data.get("save_reason", ""))
        seen[e.job_id].append((e.type.value, reason, e.data["epoch"], e.data["step"]))
    assert seen["reference"][-2:] == [("model_save", "end", 1, 16), ("train_end", "", 1, 16)]
    assert seen["resumed"][-2:] == seen["reference"][-2:]
    assert resumed.epoch == reference.epoch == 1
    assert_same_training_state(reference, resumed)


def train_in_lockstep(bus: EventBus, data_dir: Path, specs: list[dict[str, Any]]) -> list[Trainer]:
    """Train one trainer per spec at the same time, each batch of each starting together, so
    that their forward passes interleave."""
    trainers = [
        make_trainer(bus, data_dir, spec, job_id=f"job-{i}", shares_process=True)
        for i, spec in enumerate(specs)
    ]
    barrier = threading.Barrier(len(trainers), timeout=30)
    for trainer in trainers:
        trainer.add_callback("on_train_batch_start", lambda t: barrier.wait())
    results: list[RunResult] = []
    threads = [threading.Thread(target=lambda t=t: results.append(t.run())) for t in trainers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [r.outcome for r in results] == [Outcome.COMPLETED] * len(trainers)
    return trainers


async def test_concurrent_jobs_with_dropout_train_as_each_would_alone(
    bus: EventBus, data_dir: Path
) -> None:
    specs = [small_spec(seed=1), small_spec(seed=2, optimizer={"name": "adam", "lr": 0.01})]
    alone = [
        await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec) for spec in specs
    ]
    together = await anyio.to_thread.run_sync(train_in_lockstep, bus, data_dir, specs)
    for a, b in zip(alone, together, strict=True):
        assert_same_training_state(a, b)
    # numbers drawn outside a job do not move it
    torch.rand(1000)
    again = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, specs[0])
    assert_same_training_state(alone[0], again)


async def test_a_trainer_alone_in_its_process_reseeds_the_default_generators(
    bus: EventBus, data_dir: Path
) -> None:
    spec = small_spec(seed=5)
    first = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec)
    torch.rand(1000)  # what the process drew before does not move the next job
    second = await anyio.to_thread.run_sync(train_uninterrupted, bus, data_dir, spec)
    assert_same_training_state(first, second)


def test_torch_threads_is_the_latest_running_jobs_request() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
        with torch_threads(2):  # a job started later
            assert torch.get_num_threads() == 2
            with torch_threads(None):  # one that asked for nothing changes nothing
                assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1  # the later job ended
    assert torch.get_num_threads() == before
