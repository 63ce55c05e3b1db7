"""A distributed job on two hosts, simulated on this machine: the server's agent is host 0
and a real ``trainbus agent`` command, with a data folder of its own, is host 1; they meet at
the job's rendezvous on loopback. Pause, resume and stop from the API take effect on both hosts
at the same step; a stopped job resumed (the agent joins its next run) ends with the weights of
a one-host job of the same ranks never stopped; a host that never joins, or whose agent is
killed, fails the job saying so, and no process is left."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient

from .distributed_server import ENDED, distributed_server, wait_job

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, prctl")

SPEC = {
    "model": {"name": "mlp"},
    "dataset": {"name": "digits"},
    "epochs": 4,
    "batch_size": 16,
    "torch_threads": 1,
    "distributed": {"nproc_per_node": 1, "nnodes": 2, "backend": "gloo"},
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[LiveServer]:
    with distributed_server(data_dir) as live:
        yield live


def _agent(server: LiveServer, job_id: str, data: Path, *options: str) -> subprocess.Popen[str]:
    """``trainbus agent`` as another host runs it: its own data folder, the server's URL."""
    command = [
        sys.executable, "-m", "trainbus.api.cli", "agent", job_id, "--url", server.url,
        "--data-dir", str(data), "--wait", "60", *options,
    ]  # fmt: skip
    environment = {"TRAINBUS_TOKEN": server.token, "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environment
    )


def _applied(job_dir: Path, rank: int) -> list[tuple[str, int]]:
    path = job_dir / "ranks" / f"rank-{rank}.jsonl"
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [(entry["applied"], entry["step"]) for entry in entries if "applied" in entry]


def _ended(agent: subprocess.Popen[str]) -> tuple[int, str]:
    output, _ = agent.communicate(timeout=30)
    return agent.returncode, output


def _weights(client: TrainbusClient, record: dict[str, Any], folder: Path) -> dict[str, Any]:
    path = client.download_checkpoint(record["id"], record["checkpoint"], folder / record["id"])
    weights: dict[str, Any] = torch.load(path, weights_only=True)["model"]
    return weights


def test_a_job_on_two_hosts_is_steered_on_both_and_resumes_exactly(
    server: LiveServer, data_dir: Path, tmp_path: Path
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    other_host = tmp_path / "other-host"
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(SPEC)["id"]
        agent = _agent(server, job_id, other_host)
        running = wait_job(client, job_id, {"running"}, past_step=3)
        assert running["rendezvous"]["endpoint"].startswith("127.0.0.1:"), running
        client.pause(job_id)
        paused = wait_job(client, job_id, {"paused"})
        client.resume(job_id)
        wait_job(client, job_id, {"running"}, past_step=paused["step"] + 3)
        client.stop(job_id)
        stopped = wait_job(client, job_id, ENDED)
        assert stopped["state"] == "stopped", stopped
        server_side, host_1 = data_dir / "jobs" / job_id, other_host / "nodes" / job_id
        applied = _applied(server_side, 0)
        assert [kind for kind, _ in applied] == ["pause", "resume", "stop"]
        assert _applied(host_1, 1) == applied  # the other host's rank, at the same steps
        assert applied[-1][1] == stopped["step"]
        # resumed, the agent joining its next run: the weights of a one-host job with the
        # same ranks that never stopped
        client.resume(job_id)
        resumed = wait_job(client, job_id, ENDED)
        assert resumed["state"] == "completed", resumed
        code, output = _ended(agent)
        assert code == 0, output
        assert output.count(f"host 1's ranks of job {job_id} ended") == 2, output
        assert f"job {job_id} is completed: host 1 is done" in output
        one_host = {**SPEC, "distributed": {"nproc_per_node": 2}}
        straight = wait_job(client, client.submit(one_host)["id"], ENDED)
        assert straight["state"] == "completed", straight
        assert 0 < stopped["step"] < resumed["step"] == straight["step"]
        weights = [_weights(client, record, tmp_path) for record in (resumed, straight)]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[1])
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


def test_a_host_that_never_joins_fails_the_job_saying_what_to_start(server: LiveServer) -> None:
    spec = {**SPEC, "distributed": {**SPEC["distributed"], "join_timeout_seconds": 5}}
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(spec)["id"]
        record = wait_job(client, job_id, ENDED)
    assert record["state"] == "failed", record
    assert record["error"]["type"] == "HostsMissing", record["error"]
    assert f"trainbus agent {job_id} --node-rank N" in record["error"]["message"]


def test_a_killed_agent_of_the_other_host_fails_the_job_and_leaves_no_process(
    server: LiveServer, tmp_path: Path
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit({**SPEC, "epochs": 500})["id"]
        agent = _agent(server, job_id, tmp_path / "other-host")
        wait_job(client, job_id, {"running"}, past_step=3)
        psutil.Process(agent.pid).send_signal(signal.SIGKILL)
        assert _ended(agent)[0] == -signal.SIGKILL
        started = time.monotonic()
        record = wait_job(client, job_id, ENDED)
        failed_within = time.monotonic() - started
    assert record["state"] == "failed", record
    assert record["error"]["type"] == "RankFailed", record["error"]
    assert "rank 0 of 2" in record["error"]["message"], record["error"]
    assert "a rank of another host is gone" in record["error"]["message"], record["error"]
    assert failed_within < 10, failed_within
    deadline = time.monotonic() + 10
    while {p.pid for p in psutil.Process().children(recursive=True)} - before:
        assert time.monotonic() < deadline, psutil.Process().children(recursive=True)
        time.sleep(0.05)  # polling interval, bounded by the deadline


@pytest.mark.parametrize(
    ("spec", "options", "says"),
    [
        ({**SPEC, "distributed": {"nproc_per_node": 1}}, [], "runs on the server's host alone"),
        (SPEC, ["--node-rank", "2"], "--node-rank must be 1 to 1"),
    ],
)
def test_the_agent_command_refuses_a_job_or_host_it_cannot_run(
    server: LiveServer, tmp_path: Path, spec: dict[str, Any], options: list[str], says: str
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(spec)["id"]
        code, output = _ended(_agent(server, job_id, tmp_path, *options))
        client.stop(job_id)
        stopped = wait_job(client, job_id, ENDED)
    assert code == 2, output
    assert stopped["state"] == "stopped", stopped
    assert says in output, output
