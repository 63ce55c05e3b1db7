"""Runs of users' own distributed code: a plain DDP loop under ``torchrun`` and a Lightning fit
with ``strategy="ddp"``, two CPU processes each, against a real server. Rank 0 reports the
job; a stop from the API or the server's early-stop controller ends every rank at the same
step, without a hang; a pause holds every rank, and a learning rate set meanwhile reaches
every rank."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient

from .examples import EXAMPLES, job_of, wait_state

LIGHTNING_DDP = Path(__file__).with_name("lightning_ddp.py")
STOP_AT_ACCURACY = 0.8
"""A validation accuracy both models reach within a few epochs."""


def _launch(server: LiveServer, tmp_path: Path, command: list[str]) -> subprocess.Popen[str]:
    """``command`` in a session of its own (every process it starts can be ended), in
    ``tmp_path``, with torchelastic's files there too."""
    env = {**os.environ, "TRAINBUS_URL": server.url, "TRAINBUS_TOKEN": server.token}
    env.update(TMPDIR=str(tmp_path), OMP_NUM_THREADS="1")
    return subprocess.Popen(
        command,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _torchrun(server: LiveServer, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(EXAMPLES / "sdk_ddp_loop.py"), *args]  # fmt: skip
    return _launch(server, tmp_path, command)


def _lightning(server: LiveServer, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return _launch(server, tmp_path, [sys.executable, str(LIGHTNING_DDP), *args])


def _end(process: subprocess.Popen[str], timeout: float) -> str:
    """The processes' output once they all ended; none is left behind, even on a hang."""
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        # anything still running: the launcher's process group, and the ranks, which torch's
        # agent starts outside that group
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(process.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        if process.poll() is None:
            process.communicate()
    assert process.returncode == 0, output[-4000:]
    return output


def _ranks(output: str) -> dict[int, dict[str, Any]]:
    """Where each rank ended, from the last lines the ranks print."""
    ended: dict[int, dict[str, Any]] = {}
    for line in output.splitlines():
        if line.startswith('{"rank"'):
            entry = json.loads(line)
            ended[entry["rank"]] = entry
    assert sorted(ended) == [0, 1], output[-4000:]
    return ended


def _wait_training(
    client: TrainbusClient, run_id: str, process: subprocess.Popen[str], step: int
) -> str:
    """The run's job, once it has trained ``step`` steps."""
    job_id = job_of(client, run_id, process)
    deadline = time.monotonic() + 60
    while client.job(job_id)["step"] < step:
        assert process.poll() is None, process.communicate()[0][-4000:]
        assert time.monotonic() < deadline, client.job(job_id)
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return job_id


def _assert_early_stopped(client: TrainbusClient, job_id: str, epochs: int) -> dict[str, Any]:
    record = wait_state(client, job_id, "completed")
    events = client.events(job_id, types="early_stop,fit_epoch_end", limit=1000)
    fit_epochs = [e for e in events if e["type"] == "fit_epoch_end"]
    assert record["stop_reason"], record
    assert 1 <= len(fit_epochs) < epochs, "the controller did not stop the run"
    assert fit_epochs[-1]["data"]["metrics"]["val_accuracy"] >= STOP_AT_ACCURACY
    assert any(e["type"] == "early_stop" for e in events)
    return record


def test_a_ddp_loop_paused_and_stopped_from_the_api_keeps_every_rank_at_the_same_step(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "ddp-loop-stopped"
    process = _torchrun(server, tmp_path, "--run-id", run_id, "--epochs", "200",
                        "--batch-seconds", "0.005")  # fmt: skip
    try:
        with TrainbusClient(server.url, server.token) as client:
            job_id = _wait_training(client, run_id, process, step=30)
            client.pause(job_id)
            paused = wait_state(client, job_id, "paused")
            client.set_lr(job_id, 0.01)  # applied while paused, on every rank
            time.sleep(1.5)  # longer than rank 0 waits between exchanges while paused
            assert client.job(job_id)["step"] == paused["step"], "a paused run trained on"
            client.resume(job_id)
            wait_state(client, job_id, "running")
            client.stop(job_id)
            output = _end(process, timeout=60)
            record = wait_state(client, job_id, "stopped")
            jobs = [job for job in client.jobs(limit=200)["items"] if job["name"] == run_id]
    finally:
        if process.poll() is None:
            _end(process, timeout=0)
    ranks = _ranks(output)
    assert ranks[0]["step"] == ranks[1]["step"] == record["step"], (ranks, record)
    assert ranks[0]["epoch"] == ranks[1]["epoch"] < 199
    assert ranks[0]["stopped"] and ranks[1]["stopped"]
    assert ranks[0]["lr"] == ranks[1]["lr"] == 0.01
    assert len(jobs) == 1, "a rank other than 0 attached a job of its own"


def test_a_ddp_loop_is_stopped_on_every_rank_by_the_early_stop_controller(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "ddp-loop-early-stop"
    process = _torchrun(server, tmp_path, "--run-id", run_id, "--epochs", "40",
                        "--stop-at-accuracy", str(STOP_AT_ACCURACY))  # fmt: skip
    output = _end(process, timeout=90)
    ranks = _ranks(output)
    with TrainbusClient(server.url, server.token) as client:
        record = _assert_early_stopped(client, job_of(client, run_id, process), epochs=40)
    assert ranks[0]["step"] == ranks[1]["step"] == record["step"], (ranks, record)
    assert ranks[0]["epoch"] == ranks[1]["epoch"] == record["epoch"]
    assert ranks[0]["stopped"] and ranks[1]["stopped"]


def test_a_lightning_ddp_fit_stopped_from_the_api_ends_every_rank_at_the_same_step(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "lightning-ddp-stopped"
    process = _lightning(server, tmp_path, "--run-id", run_id, "--epochs", "200",
                         "--batch-seconds", "0.005")  # fmt: skip
    try:
        with TrainbusClient(server.url, server.token) as client:
            job_id = _wait_training(client, run_id, process, step=30)
            client.stop(job_id)
            output = _end(process, timeout=60)
            record = wait_state(client, job_id, "stopped")
    finally:
        if process.poll() is None:
            _end(process, timeout=0)
    ranks = _ranks(output)
    assert ranks[0]["step"] == ranks[1]["step"] == record["step"], (ranks, record)
    assert ranks[0]["epoch"] == ranks[1]["epoch"] < 199


def test_a_lightning_ddp_fit_is_stopped_on_every_rank_by_the_early_stop_controller(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "lightning-ddp-early-stop"
    process = _lightning(server, tmp_path, "--run-id", run_id, "--epochs", "40",
                         "--stop-at-accuracy", str(STOP_AT_ACCURACY))  # fmt: skip
    output = _end(process, timeout=90)
    ranks = _ranks(output)
    with TrainbusClient(server.url, server.token) as client:
        record = _assert_early_stopped(client, job_of(client, run_id, process), epochs=40)
    assert ranks[0]["step"] == ranks[1]["step"] == record["step"], (ranks, record)
    assert ranks[0]["epoch"] == ranks[1]["epoch"]
