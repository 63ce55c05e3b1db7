"""A Hugging Face ``Trainer`` under ``torchrun`` (DDP over gloo, two CPU processes) with the
``TrainbusCallback``, against a real server: rank 0 reports the job, and a pause, a learning
rate, a save and a stop from the API, or the server's early-stop controller, take effect on
every rank at the same step; every rank process ends, none hangs."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient

from .examples import job_of, wait_state
from .test_distributed_sdk import (
    STOP_AT_ACCURACY,
    _assert_early_stopped,
    _launch,
    _ranks,
    _wait_training,
)

HUGGINGFACE_DDP = Path(__file__).with_name("huggingface_ddp.py")


def _torchrun(server: LiveServer, tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", "2", str(HUGGINGFACE_DDP), *args]  # fmt: skip
    return _launch(server, tmp_path, command)


def _rank_processes(process: subprocess.Popen[str]) -> list[psutil.Process]:
    """The two rank processes torchrun starts. They run in sessions of their own, out of
    reach of a signal to torchrun's, so the test ends them by their ids."""
    torchrun = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while len(ranks := torchrun.children(recursive=True)) < 2:
        if process.poll() is not None or time.monotonic() > deadline:
            output = _kill(process, ranks)
            raise AssertionError(f"torchrun started no ranks: {output[-4000:]}")
        time.sleep(0.05)  # polling interval, bounded by the deadline
    assert len(ranks) == 2, ranks
    return ranks


def _end(process: subprocess.Popen[str], ranks: list[psutil.Process], timeout: float) -> str:
    """torchrun's output once it and both ranks ended."""
    try:
        output = process.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        output = _kill(process, ranks)
        raise AssertionError(f"the ranks did not end in {timeout} s: {output[-4000:]}") from None
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive, f"rank processes outlived torchrun: {alive}"
    assert process.returncode == 0, output[-4000:]
    return output


def _kill(process: subprocess.Popen[str], ranks: list[psutil.Process]) -> str:
    """End torchrun and its ranks, whatever state they are in (none is left behind); the
    output not read yet."""
    for rank in ranks:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank.kill()
    if process.returncode is not None:
        return ""
    process.kill()
    return process.communicate()[0] or ""


def _applied(client: TrainbusClient, job_id: str, event_type: str) -> dict[str, Any]:
    """The data of the job's one ``event_type`` event (a command's acknowledgement)."""
    events = client.events(job_id, types=event_type)
    assert len(events) == 1, events
    return dict(events[0]["data"])


def test_a_huggingface_ddp_training_steered_from_the_api_ends_every_rank_at_the_same_step(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "huggingface-ddp-stopped"
    process = _torchrun(server, tmp_path, "--run-id", run_id, "--epochs", "200",
                        "--batch-seconds", "0.005")  # fmt: skip
    ranks = _rank_processes(process)
    try:
        with TrainbusClient(server.url, server.token) as client:
            job_id = _wait_training(client, run_id, process, step=10)
            client.pause(job_id)
            wait_state(client, job_id, "paused")
            client.set_lr(job_id, 0.002)  # applied while paused, on every rank
            client.resume(job_id)
            wait_state(client, job_id, "running")
            client.save(job_id)
            client.stop(job_id)
            output = _end(process, ranks, timeout=60)
            record = wait_state(client, job_id, "stopped")
            stopping = _applied(client, job_id, "job_stopping")
            saves = client.events(job_id, types="model_save")
            pause = _applied(client, job_id, "job_paused")
            resume = _applied(client, job_id, "job_resumed")
            jobs = [job for job in client.jobs(limit=200)["items"] if job["name"] == run_id]
    finally:
        _kill(process, ranks)
    ended = _ranks(output)
    assert ended[0]["step"] == ended[1]["step"] == stopping["step"] == record["step"], (
        ended,
        stopping,
        record,
    )
    assert ended[0]["stopped"] and ended[1]["stopped"]
    assert ended[0]["epoch"] == ended[1]["epoch"] < 199
    assert pause["step"] == resume["step"], (pause, resume)  # no step while paused
    # every rank's optimizer, and its schedule, which sets the rate again at each step
    assert ended[0]["lr"] == ended[1]["lr"] == 0.002
    # the Trainer wrote the pause's checkpoint and the save's on every rank, at the steps their
    # model_save events name
    assert [event["data"]["save_reason"] for event in saves] == ["pause", "command"], saves
    assert ended[0]["saved"] == ended[1]["saved"] == [e["data"]["step"] for e in saves], saves
    assert len(jobs) == 1, "a rank other than 0 attached a job of its own"


def test_a_huggingface_ddp_training_is_stopped_on_every_rank_by_the_early_stop_controller(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "huggingface-ddp-early-stop"
    process = _torchrun(server, tmp_path, "--run-id", run_id, "--epochs", "40",
                        "--stop-at-accuracy", str(STOP_AT_ACCURACY))  # fmt: skip
    ranks = _rank_processes(process)
    try:
        output = _end(process, ranks, timeout=90)
    finally:
        _kill(process, ranks)
    ended = _ranks(output)
    with TrainbusClient(server.url, server.token) as client:
        record = _assert_early_stopped(client, job_of(client, run_id, process), epochs=40)
    assert ended[0]["step"] == ended[1]["step"] == record["step"], (ended, record)
    # the Trainer's epoch counts the epochs done; the job's is the last one's index
    assert ended[0]["epoch"] == ended[1]["epoch"] == record["epoch"] + 1, (ended, record)
    assert ended[0]["stopped"] and ended[1]["stopped"]
