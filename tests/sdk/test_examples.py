"""The SDK's example scripts, run as a user runs them against a real server: watched over the
WebSocket stream while paused, resumed and stopped from the API, and stopped by the server's
early-stop controller."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient

from .examples import job_of as _job_of
from .examples import start_example
from .examples import wait_state as _wait_state

EXAMPLES = {
    "plain": "sdk_plain_loop.py",
    "lightning": "sdk_lightning.py",
    "huggingface": "sdk_huggingface.py",
}
STOP_AT_ACCURACY = {"plain": 0.8, "lightning": 0.8, "huggingface": 0.3}
"""A validation accuracy each example's model reaches within a few epochs (the tiny BERT
learns the digits slowly)."""


def _start(server: LiveServer, example: str, cwd: Path, *args: str) -> subprocess.Popen[str]:
    return start_example(server, sys.executable, EXAMPLES[example], cwd, *args)


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_an_example_is_watched_paused_resumed_and_stopped(
    server: LiveServer, example: str, tmp_path: Path
) -> None:
    run_id = f"example-{example}-steered"
    process = _start(server, example, tmp_path, "--run-id", run_id, "--epochs", "200",
                     "--batch-seconds", "0.005")  # fmt: skip
    try:
        with TrainbusClient(server.url, server.token) as client:
            job_id = _job_of(client, run_id, process)
            watched: list[str] = []

            def watch() -> None:
                with TrainbusClient(server.url, server.token) as watcher:
                    watched.extend(event["type"] for event in watcher.stream(job_id))

            watcher = threading.Thread(target=watch)
            watcher.start()
            running = _wait_state(client, job_id, "running")
            deadline = time.monotonic() + 60
            while client.job(job_id)["step"] < 30:
                assert time.monotonic() < deadline, running
                time.sleep(0.02)  # polling interval, bounded by the deadline
            client.pause(job_id)
            paused = _wait_state(client, job_id, "paused")
            time.sleep(0.3)
            assert client.job(job_id)["step"] == paused["step"], "a paused example trained on"
            client.resume(job_id)
            _wait_state(client, job_id, "running")
            client.stop(job_id)
            output = process.communicate(timeout=90)[0]
            assert process.returncode == 0, output[-3000:]
            record = _wait_state(client, job_id, "stopped")
            watcher.join(timeout=60)
            assert not watcher.is_alive(), "the stream did not end with the job"
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert record["epoch"] < 199
    for expected in ("train_batch_end", "job_paused", "job_resumed", "job_stopping",
                     "fit_epoch_end", "job_stopped"):  # fmt: skip
        assert expected in watched, expected
    assert watched.index("job_paused") < watched.index("job_resumed") < watched.index("job_stopped")


@pytest.mark.parametrize("example", sorted(EXAMPLES))
def test_an_example_is_stopped_by_the_early_stop_controller(
    server: LiveServer, example: str, tmp_path: Path
) -> None:
    run_id = f"example-{example}-early-stop"
    threshold = STOP_AT_ACCURACY[example]
    process = _start(server, example, tmp_path, "--run-id", run_id, "--epochs", "60",
                     "--stop-at-accuracy", str(threshold))  # fmt: skip
    output = process.communicate(timeout=240)[0]
    assert process.returncode == 0, output[-3000:]
    with TrainbusClient(server.url, server.token) as client:
        job_id = _job_of(client, run_id, process)
        record = _wait_state(client, job_id, "completed")
        events = client.events(job_id, types="early_stop,fit_epoch_end", limit=1000)
    epochs = [e for e in events if e["type"] == "fit_epoch_end"]
    assert record["stop_reason"], record
    assert 1 <= len(epochs) < 60, "the controller did not stop the run"
    assert epochs[-1]["data"]["metrics"]["val_accuracy"] >= threshold
    # the epoch before the last had not reached the threshold: the stop came at once
    assert all(e["data"]["metrics"]["val_accuracy"] < threshold for e in epochs[:-1])
    assert any(e["type"] == "early_stop" for e in events)
