"""The SDK against a real server: a user's own loop becomes a job, is steered from the API
and by the server's controllers, and continues across its own restarts."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import TrainbusClient, create_app
from trainbus.sdk import Run, RunRefused, ServerUnreachable, init

from .loop import digits, model_and_optimizer, train

ENDED = ("completed", "stopped", "failed", "interrupted")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path / "data", run_jobs_in="thread", resource_interval_seconds=60.0
    )
    with run_server(create_app(settings), settings) as live:
        yield live


def _client(server: LiveServer) -> TrainbusClient:
    return TrainbusClient(server.url, server.token)


def _events(server: LiveServer, job_id: str) -> list[dict[str, Any]]:
    with _client(server) as client:
        events: list[dict[str, Any]] = []
        while page := client.events(job_id, after_seq=events[-1]["seq"] if events else 0):
            events.extend(page)
        return events


def _wait(server: LiveServer, job_id: str, condition: Any, what: str) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    with _client(server) as client:
        while True:
            record = client.job(job_id)
            if condition(record):
                return record
            assert time.monotonic() < deadline, f"{what}: {record}"
            time.sleep(0.02)  # polling interval, bounded by the deadline


def test_a_plain_loop_becomes_a_job_with_the_built_in_vocabulary(
    server: LiveServer, tmp_path: Path
) -> None:
    model, optimizer = model_and_optimizer()
    data = digits()
    with init(
        "digits-plain",
        url=server.url,
        token=server.token,
        config={"lr": 0.05, "hidden": 32},
        epochs=3,
        model=model,
        optimizer=optimizer,
        checkpoint_dir=tmp_path / "ckpt",
    ) as run:
        trained = train(run, model, optimizer, data)
        job_id = run.job_id
    assert job_id is not None
    assert trained.epochs == [0, 1, 2]
    record = _events_record = _wait(server, job_id, lambda r: r["state"] in ENDED, "ended")
    assert record["state"] == "completed", record
    assert record["name"] == "digits-plain"
    assert record["spec"]["config"] == {"lr": 0.05, "hidden": 32}
    assert record["step"] == trained.batches == 3 * len(data.train)
    assert record["metrics"]["val_accuracy"] > 0.5
    events = _events(server, job_id)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1)), "the stream has a gap or a duplicate"
    types = [e["type"] for e in events]
    vocabulary = {
        "job_queued", "job_started", "train_start", "train_epoch_start", "train_batch_start",
        "optimizer_step", "train_batch_end", "train_epoch_end", "val_end", "fit_epoch_end",
        "model_save", "train_end", "job_completed",
    }  # fmt: skip
    assert vocabulary <= set(types), vocabulary - set(types)
    batch_steps = [e["data"]["step"] for e in events if e["type"] == "train_batch_end"]
    assert batch_steps == list(range(1, trained.batches + 1))
    first_batch = next(e for e in events if e["type"] == "train_batch_end")
    assert set(first_batch["data"]) == {"epoch", "batch", "step", "loss", "lr", "batch_size"}
    epoch_end = [e for e in events if e["type"] == "fit_epoch_end"][-1]
    assert {"train_loss", "val_loss", "val_accuracy", "lr"} <= set(epoch_end["data"]["metrics"])
    assert (tmp_path / "ckpt" / "digits-plain" / "last.pt").is_file()
    assert _events_record["metrics"] == epoch_end["data"]["metrics"]


def test_pause_resume_save_set_lr_and_stop_from_the_api_take_effect_in_the_loop(
    server: LiveServer, tmp_path: Path
) -> None:
    model, optimizer = model_and_optimizer()
    data = digits()
    run = init(
        "digits-steered",
        url=server.url,
        token=server.token,
        epochs=200,
        model=model,
        optimizer=optimizer,
        checkpoint_dir=tmp_path / "ckpt",
    )
    job_id = run.job_id
    assert job_id is not None
    outcome: dict[str, Any] = {}

    def loop() -> None:
        with run:
            outcome["trained"] = train(run, model, optimizer, data, batch_seconds=0.002)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        with _client(server) as client:
            _wait(server, job_id, lambda r: r["step"] >= 5, "training")
            paused = client.pause(job_id)
            _wait(server, job_id, lambda r: r["state"] == "paused", "paused")
            held = run.step
            time.sleep(0.3)  # a paused loop does not move
            assert run.step == held and run.paused
            client.resume(job_id)
            _wait(server, job_id, lambda r: r["state"] == "running", "resumed")
            _wait(server, job_id, lambda r: r["step"] > held + 5, "training after resume")
            changed = client.set_lr(job_id, 0.0123)
            saved = client.save(job_id)
            deadline = time.monotonic() + 20
            while optimizer.param_groups[0]["lr"] != 0.0123:
                assert time.monotonic() < deadline, "set_lr did not reach the optimizer"
                time.sleep(0.01)  # polling interval, bounded by the deadline
            stopped = client.stop(job_id)
        thread.join(timeout=60)
        assert not thread.is_alive(), "the loop did not end after stop"
    finally:
        run.should_stop = True
        thread.join(timeout=60)
    record = _wait(server, job_id, lambda r: r["state"] in ENDED, "ended")
    assert record["state"] == "stopped", record
    events = _events(server, job_id)
    by_command = {
        e["data"].get("command_id"): e for e in events if e["data"].get("command_id") is not None
    }
    for command, applied in (
        (paused, "job_paused"),
        (changed, "lr_changed"),
        (saved, "model_save"),
        (stopped, "job_stopping"),
    ):
        event = by_command.get(command["command_id"])
        assert event is not None and event["type"] == applied, (command, event)
        assert isinstance(event["data"]["step"], int)
    assert by_command[changed["command_id"]]["data"]["lr"] == 0.0123
    assert by_command[saved["command_id"]]["data"]["save_reason"] == "command"
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))
    assert outcome["trained"].epochs[-1] < 199


def test_the_servers_early_stop_controller_stops_the_loop_before_the_next_epoch(
    server: LiveServer,
) -> None:
    model, optimizer = model_and_optimizer()
    data = digits()
    worse_after = 2  # val_loss improves for epochs 0..2, then only gets worse

    def val_loss(epoch: int, measured: float) -> float:
        return 1.0 - 0.1 * epoch if epoch <= worse_after else 1.0 + 0.1 * epoch

    with init(
        "digits-early-stop",
        url=server.url,
        token=server.token,
        epochs=30,
        model=model,
        optimizer=optimizer,
        early_stop={"enabled": True, "monitor": "val_loss", "patience": 2},
        on_save=lambda step, reason: None,
    ) as run:
        trained = train(run, model, optimizer, data, val_loss=val_loss)
        job_id = run.job_id
    assert job_id is not None
    # patience 2: epochs 3 and 4 do not improve on epoch 2, and no epoch starts after 4
    assert trained.epochs == [0, 1, 2, 3, 4]
    record = _wait(server, job_id, lambda r: r["state"] in ENDED, "ended")
    assert record["state"] == "completed", record
    assert record["stop_reason"] == "patience_exhausted", record
    types = [e["type"] for e in _events(server, job_id)]
    assert "early_stop" in types


def test_a_restarted_process_continues_its_job_from_its_checkpoint(
    server: LiveServer, tmp_path: Path
) -> None:
    data = digits()
    model, optimizer = model_and_optimizer()
    options: dict[str, Any] = {
        "url": server.url,
        "token": server.token,
        "epochs": 4,
        "checkpoint_dir": tmp_path / "ckpt",
    }

    def crash(epoch: int) -> None:
        if epoch == 1:
            raise KeyboardInterrupt  # the process is stopped after its second epoch

    with (
        pytest.raises(KeyboardInterrupt),
        init("digits-restart", model=model, optimizer=optimizer, **options) as first,
    ):
        train(first, model, optimizer, data, after_epoch=crash)
    job_id = first.job_id
    assert job_id is not None
    record = _wait(server, job_id, lambda r: r["state"] in ENDED, "interrupted")
    assert record["state"] == "interrupted", record
    step_at_checkpoint = 2 * len(data.train)

    model, optimizer = model_and_optimizer(seed=99)  # a new process: fresh weights
    with init("digits-restart", model=model, optimizer=optimizer, **options) as second:
        assert second.job_id == job_id, "the same run id names the same job"
        assert second.resumed_from_step == step_at_checkpoint
        trained = train(second, model, optimizer, data)
    assert trained.epochs == [2, 3]
    record = _wait(server, job_id, lambda r: r["state"] in ENDED, "completed")
    assert record["state"] == "completed", record
    assert record["step"] == 4 * len(data.train)
    events = _events(server, job_id)
    starts = [e for e in events if e["type"] == "train_start"]
    assert [s["data"].get("from_step") for s in starts] == [None, step_at_checkpoint]
    assert starts[1]["data"]["resumed"] is True
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(seqs) + 1))


def test_an_unreachable_server_at_start_is_a_clear_error_within_the_timeout() -> None:
    from tests.conftest import free_port

    started = time.monotonic()
    with pytest.raises(ServerUnreachable, match="trainbus serve"):
        init("nobody-home", url=f"http://127.0.0.1:{free_port()}", token="t" * 20,
             connect_timeout=1.0)  # fmt: skip
    assert time.monotonic() - started < 5


def test_a_wrong_token_or_bad_run_is_refused_with_the_servers_reason(server: LiveServer) -> None:
    with pytest.raises(RunRefused, match="401"):
        init("wrong-token", url=server.url, token="wrong-token-0123456789")
    with pytest.raises(RunRefused, match="run id"):
        Run("no spaces allowed", url=server.url, token=server.token)
    with pytest.raises(RunRefused, match="config"):
        init("bad-config", url=server.url, token=server.token, config={"x": float("nan")})


def test_the_same_idempotency_key_never_makes_a_second_job(server: LiveServer) -> None:
    spec = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1}
    headers = {**{"Authorization": f"Bearer {server.token}"}, "Idempotency-Key": "nightly-42"}
    first = httpx.post(server.url + "/jobs", json=spec, headers=headers)
    again = httpx.post(server.url + "/jobs", json=spec, headers=headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = httpx.post(server.url + "/jobs", json={**spec, "epochs": 2}, headers=headers)
    assert other.status_code == 409
    assert "Idempotency-Key" in other.json()["detail"]
    with _client(server) as client:
        assert client.jobs()["total"] == 1


def test_the_sdk_imports_no_server_code() -> None:
    script = (
        "import sys, trainbus.sdk\n"
        "heavy = {'fastapi', 'uvicorn', 'sqlite3', 'trainbus.api', 'trainbus.worker',"
        " 'trainbus.subscribers', 'prometheus_client', 'lightning', 'transformers'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


def test_a_process_that_dies_without_finishing_reports_it_and_exits(server: LiveServer) -> None:
    script = (
        "import sys, trainbus.sdk\n"
        "run = trainbus.sdk.init('dies-in-its-loop', url=sys.argv[1], token=sys.argv[2])\n"
        "for epoch in run.epochs():\n"
        "    run.log_batch(1.0)\n"
        "    raise RuntimeError('boom in the user loop')\n"
    )
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", script, server.url, server.token],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "boom in the user loop" in result.stderr
    assert time.monotonic() - started < 30, "the process hung on the SDK's thread"
    with _client(server) as client:
        job = next(j for j in client.jobs()["items"] if j["name"] == "dies-in-its-loop")
    record = _wait(server, job["id"], lambda r: r["state"] in ENDED, "ended")
    assert record["state"] == "failed", record
    assert "boom in the user loop" in str(record["error"])


def test_an_attached_run_takes_no_running_slot_of_the_server(server: LiveServer) -> None:
    """SDK runs train in their own processes: a built-in job starts beside an attached run
    although the server runs one job at a time (``max_running_jobs`` 1)."""
    attached = httpx.put(
        f"{server.url}/runs/elsewhere", json={"epochs": 5},
        headers={"Authorization": f"Bearer {server.token}"},
    )  # fmt: skip
    assert attached.status_code == 201, attached.text
    assert attached.json()["job"]["state"] == "running"
    spec = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1}
    with _client(server) as client:
        job_id = client.submit(spec)["id"]
    record = _wait(server, job_id, lambda r: r["state"] in ENDED, "the built-in job to end")
    assert record["state"] == "completed", record


def test_a_second_connection_of_a_run_replaces_the_first_which_is_told_so(
    server: LiveServer,
) -> None:
    """A process that reconnects (its first connection hung) takes over the run: the server
    closes the old connection with the code that says so, not an internal error."""
    from websockets.sync.client import connect

    from trainbus.sdk import CLOSE_REPLACED
    from trainbus.sdk._attach import ServerAddress, attach_run
    from trainbus.sdk._protocol import PROTOCOL_VERSION

    address = ServerAddress(server.url, server.token)
    attachment = attach_run(
        address, "taken-over", {"name": "taken over", "config": {}, "epochs": 1}, timeout=10
    )
    hello = json.dumps(
        {
            "type": "hello",
            "protocol": PROTOCOL_VERSION,
            "job_id": attachment.job_id,
            "session": "the-reconnecting-process",
            "next": None,
        }
    )
    headers = {"Authorization": f"Bearer {attachment.worker_token}"}
    url = address.worker_url(attachment.job_id)
    with connect(url, additional_headers=headers, open_timeout=10) as first:
        first.send(hello)
        assert json.loads(first.recv(timeout=10))["type"] == "welcome"
        with connect(url, additional_headers=headers, open_timeout=10) as second:
            second.send(hello)
            assert json.loads(second.recv(timeout=10))["type"] == "welcome"
            first.send(json.dumps({"type": "heartbeat", "step": 0, "epoch": 0}))
            with pytest.raises(ConnectionClosed):
                first.recv(timeout=10)  # a heartbeat has no answer: the next frame is the close
            assert first.close_code == CLOSE_REPLACED, (first.close_code, first.close_reason)
            assert "newer connection" in (first.close_reason or "")
