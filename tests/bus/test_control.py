"""The control channel: a trainer thread honouring commands at safe points."""

from __future__ import annotations

import threading

import anyio
import pytest

from trainbus.bus import (
    Command,
    CommandKind,
    ControlChannel,
    ControlError,
    Event,
    EventBus,
    EventType,
)


class FakeTrainingLoop:
    """The trainer side of the protocol, as the real Trainer runs it, on a plain thread."""

    def __init__(self, channel: ControlChannel, steps: int) -> None:
        self.channel = channel
        self.steps = steps
        self.step = 0
        self.lr = 0.1
        self.outcome = ""
        self.paused_at: list[int] = []
        self.at_step = threading.Event()
        self.wait_calls = 0

    def run(self) -> None:
        while self.step < self.steps:
            self.step += 1
            if self.step == 5:
                self.at_step.set()
            if self.channel.pending and self._apply(self.channel.take()):
                return
        self.outcome = "completed"

    def _apply(self, commands: list[Command]) -> bool:
        for command in commands:
            if command.kind is CommandKind.STOP:
                self.channel.applied(command, step=self.step)
                self.outcome = f"stopped: {command.reason}"
                return True
            if command.kind is CommandKind.SET_LR:
                assert command.value is not None
                self.lr = command.value
                self.channel.applied(command, step=self.step, lr=self.lr)
            elif command.kind is CommandKind.PAUSE:
                self.channel.applied(command, step=self.step)
                self.paused_at.append(self.step)
                while True:  # hold without spinning: wait() blocks the thread
                    self.wait_calls += 1
                    more = self.channel.wait()
                    if any(c.kind is CommandKind.RESUME for c in more):
                        for c in more:
                            if c.kind is CommandKind.RESUME:
                                self.channel.applied(c, step=self.step)
                        break
                    if self._apply(more):
                        return True
        return False


async def test_pause_resume_set_lr_and_stop_round_trip_with_audit_events() -> None:
    async with EventBus() as bus:
        subscription = bus.subscribe("audit", job_id="job")
        channel = ControlChannel("job", publish=bus.publish)
        loop = FakeTrainingLoop(channel, steps=10_000_000)
        thread = threading.Thread(target=loop.run, daemon=True)
        thread.start()
        await anyio.to_thread.run_sync(loop.at_step.wait, 10)
        pause = channel.pause("look at the curves")
        paused = await subscription.receive()
        held_step = loop.step
        assert paused.type is EventType.JOB_PAUSED
        assert paused.data["command_id"] == pause.id
        assert paused.data["reason"] == "look at the curves"
        assert paused.data["step"] == held_step
        set_lr = channel.set_lr(0.01, source="lr_plateau")
        assert (await subscription.receive()).data["lr"] == 0.01
        assert loop.step == held_step  # still held
        channel.resume()
        assert (await subscription.receive()).type is EventType.JOB_RESUMED
        stop = channel.stop("enough", source="user")
        stopping = await subscription.receive()
        await anyio.to_thread.run_sync(thread.join, 10)
    assert stopping.type is EventType.JOB_STOPPING
    assert stopping.data["command_id"] == stop.id and stopping.data["source"] == "user"
    assert loop.wait_calls == 2  # woke for set_lr, then for resume: no spinning
    assert loop.outcome == "stopped: enough"
    assert loop.lr == 0.01 and set_lr.value == 0.01
    assert loop.step > held_step


def test_commands_are_validated_and_a_closed_channel_refuses_them() -> None:
    channel = ControlChannel("job")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ControlError, match="positive, finite"):
            channel.set_lr(bad)
    with pytest.raises(ValueError, match="explode"):
        channel.send("explode")
    assert channel.take() == []
    command = channel.save("checkpoint now", source="api")
    assert command.kind is CommandKind.SAVE and command.source == "api"
    assert [c.id for c in channel.take()] == [command.id]
    channel.close()
    with pytest.raises(ControlError, match="no longer accepts"):
        channel.stop()
    assert channel.wait(timeout=5) == []  # a closed channel releases a waiting trainer


def test_applied_without_a_publisher_is_a_no_op() -> None:
    channel = ControlChannel("job")
    assert channel.applied(channel.stop(), step=3) is None


def test_each_command_kind_maps_to_its_audit_event() -> None:
    published: list[tuple[str, EventType]] = []

    def publish(job_id: str, type: EventType, data: object) -> Event:
        published.append((job_id, type))
        return Event(job_id, len(published), type, 0.0, {})

    channel = ControlChannel("job", publish=publish)
    for command in (channel.stop(), channel.pause(), channel.resume(), channel.save()):
        channel.applied(command, step=1)
    channel.applied(channel.set_lr(0.5), step=1)
    assert [t for _, t in published] == [
        EventType.JOB_STOPPING,
        EventType.JOB_PAUSED,
        EventType.JOB_RESUMED,
        EventType.MODEL_SAVE,
        EventType.LR_CHANGED,
    ]
