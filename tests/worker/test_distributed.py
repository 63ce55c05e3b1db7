"""Distributed jobs through a real server: the job's worker process is torch's elastic agent
with two gloo ranks on the CPU; rank 0 reports the job. A 2-rank job completes with figures
over both ranks; pause, resume, set_lr, save and stop from the API, and early stopping in rank
0, take effect on both ranks at the same step; a stopped job resumed ends with the weights of
one never stopped; a server that shuts down interrupts the job, which resumes after; a rank
(or the agent) killed fails the job naming it, and no process of the job is left; a
distributed section the server cannot run is refused with what to fix."""

from __future__ import annotations

import contextlib
import json
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import TrainbusClient, create_app
from trainbus.api.client import HTTPStatusError

from .distributed_server import ENDED, distributed_server, wait_job

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, prctl")

SPEC = {
    "model": {"name": "mlp"},
    "dataset": {"name": "digits"},
    "epochs": 2,
    "batch_size": 64,
    "torch_threads": 2,
    "distributed": {"nproc_per_node": 2, "backend": "gloo"},
}


LONG = {**SPEC, "epochs": 500, "batch_size": 16}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def server(data_dir: Path) -> Iterator[LiveServer]:
    with distributed_server(data_dir) as live:
        yield live


def _rank_records(data_dir: Path, job_id: str, rank: int) -> list[dict[str, Any]]:
    path = data_dir / "jobs" / job_id / "ranks" / f"rank-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def _agent(server: LiveServer, job_id: str) -> psutil.Process:
    supervisor = server.services.jobs.manager.supervisor  # type: ignore[attr-defined]
    return psutil.Process(supervisor.runs[job_id].process.pid)


def _wait_rank_metrics(client: TrainbusClient, job_id: str) -> None:
    """/metrics shows each rank's CPU time and memory, labelled by rank."""
    names = ("cpu_seconds_total", "resident_memory_bytes")
    wanted = [
        f'trainbus_job_rank_{name}{{job_id="{job_id}",rank="{rank}"}}'
        for name in names
        for rank in (0, 1)
    ]
    deadline = time.monotonic() + 10
    while not all(series in (text := client.metrics()) for series in wanted):
        assert time.monotonic() < deadline, [s for s in wanted if s not in text]
        time.sleep(0.1)  # polling interval, bounded by the deadline


def _rank_process(data_dir: Path, job_id: str, rank: int) -> psutil.Process:
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(OSError, IndexError):
            return psutil.Process(_rank_records(data_dir, job_id, rank)[0]["pid"])
        assert time.monotonic() < deadline, "the rank did not start"
        time.sleep(0.02)  # polling interval, bounded by the deadline


def test_a_two_rank_job_completes_with_figures_over_both_ranks(
    server: LiveServer, data_dir: Path
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(SPEC)["id"]
        record = wait_job(client, job_id, ENDED)
        events = client.events(job_id)
    assert record["state"] == "completed", record
    train_samples = next(e for e in events if e["type"] == "pretrain_routine_end")["data"][
        "train_samples"
    ]
    shard = -(-train_samples // 2)  # each rank trains on half, padded to the same length
    assert record["step"] == 2 * -(-shard // SPEC["batch_size"])
    ranks = [_rank_records(data_dir, job_id, rank) for rank in (0, 1)]
    epochs = [[entry for entry in records if "loss_sum" in entry] for records in ranks]
    assert [len(e) for e in epochs] == [2, 2]
    assert all(entry["samples"] == shard for rank in epochs for entry in rank)
    # fit_epoch_end reports the loss over both ranks' samples, not rank 0's alone
    fit_ends = [e["data"] for e in events if e["type"] == "fit_epoch_end"]
    for epoch, fit_end in enumerate(fit_ends):
        parts = [rank[epoch] for rank in epochs]
        overall = sum(p["loss_sum"] for p in parts) / sum(p["samples"] for p in parts)
        assert fit_end["metrics"]["train_loss"] == pytest.approx(overall, rel=1e-9)
        assert fit_end["metrics"]["train_loss"] != pytest.approx(
            parts[0]["loss_sum"] / parts[0]["samples"], rel=1e-6
        )
    assert fit_ends[-1]["metrics"]["val_accuracy"] > 0.5


def test_commands_from_the_api_take_effect_on_both_ranks_at_the_same_step(
    server: LiveServer, data_dir: Path
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(LONG)["id"]
        wait_job(client, job_id, {"running"}, past_step=3)
        client.pause(job_id)
        paused = wait_job(client, job_id, {"paused"})
        time.sleep(2.5)  # held past a few of the ranks' exchanges while paused
        client.resume(job_id)
        running = wait_job(client, job_id, {"running"}, past_step=paused["step"] + 3)
        client.set_lr(job_id, 0.0005)
        client.save(job_id)
        wait_job(client, job_id, {"running"}, past_step=running["step"] + 3)
        client.stop(job_id)
        record = wait_job(client, job_id, ENDED)
        events = client.events(job_id)
    assert record["state"] == "stopped", record
    applied = [
        [(e["applied"], e["command_id"], e["step"]) for e in _rank_records(data_dir, job_id, r)
         if "applied" in e]
        for r in (0, 1)
    ]  # fmt: skip
    assert [kind for kind, _, _ in applied[0]] == ["pause", "resume", "set_lr", "save", "stop"]
    assert applied[0] == applied[1]
    # the acknowledgements name the step every rank applied the command at
    acknowledged = {
        e["data"]["command_id"]: e["data"]["step"]
        for e in events
        if e["type"] in ("job_paused", "job_resumed", "lr_changed", "model_save", "job_stopping")
        and "command_id" in e["data"]
    }
    assert {command: step for _, command, step in applied[0]} == acknowledged
    (_, _, paused_at), (_, _, resumed_at), _, _, (_, _, stopped_at) = applied[0]
    assert resumed_at == paused_at  # no rank trained while paused
    assert stopped_at == record["step"]


def test_commands_sent_at_random_moments_take_effect_on_both_ranks_at_the_same_step(
    server: LiveServer, data_dir: Path
) -> None:
    seed = random.randrange(2**32)
    draw = random.Random(seed)
    sent = []
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(LONG)["id"]
        wait_job(client, job_id, {"running"}, past_step=3)
        paused = False
        for _ in range(8):
            time.sleep(draw.uniform(0.0, 0.3))  # a random moment between two commands
            kind = draw.choice(
                ["resume", "save", "set_lr"] if paused else ["pause", "save", "set_lr"]
            )
            if kind == "set_lr":
                client.set_lr(job_id, draw.choice([1e-3, 5e-4, 2e-4]))
            else:
                getattr(client, kind)(job_id)
            if kind in ("pause", "resume"):
                paused = kind == "pause"
                wait_job(client, job_id, {"paused" if paused else "running"})
            sent.append(kind)
        time.sleep(draw.uniform(0.0, 0.3))
        client.stop(job_id)
        record = wait_job(client, job_id, ENDED)
    assert record["state"] == "stopped", (seed, record)
    applied = [
        [(e["applied"], e["command_id"], e["step"]) for e in _rank_records(data_dir, job_id, r)
         if "applied" in e]
        for r in (0, 1)
    ]  # fmt: skip
    assert [kind for kind, _, _ in applied[0]] == [*sent, "stop"], (seed, applied[0])
    assert applied[0] == applied[1], seed  # every command, at the same step on both ranks
    assert applied[0][-1][2] == record["step"], seed
    # and no rank is left waiting in a collective
    ranks = [_rank_records(data_dir, job_id, r)[0]["pid"] for r in (0, 1)]
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in ranks):
        assert time.monotonic() < deadline, (seed, ranks)
        time.sleep(0.05)  # polling interval, bounded by the deadline


def test_early_stopping_in_rank_0_ends_every_rank_at_the_same_step(
    server: LiveServer, data_dir: Path
) -> None:
    spec = {
        **SPEC,
        "epochs": 5,
        "early_stop": {"enabled": True, "monitor": "val_accuracy", "mode": "max",
                       "stopping_threshold": 0.05},
    }  # fmt: skip
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(spec)["id"]
        record = wait_job(client, job_id, ENDED)
    assert record["state"] == "completed", record
    assert "threshold" in (record["stop_reason"] or ""), record
    stops = [
        [(e["applied"], e["step"]) for e in _rank_records(data_dir, job_id, r) if "applied" in e]
        for r in (0, 1)
    ]
    assert stops[0] == stops[1] == [("stop", record["step"])]
    assert record["epoch"] == 1  # it ended after its first epoch


def test_two_ranks_train_as_one_process_on_batches_twice_as_large(
    server: LiveServer, tmp_path: Path
) -> None:
    # rank r's batch k is every other sample of the one-process batch k of twice the size, so
    # averaging the ranks' gradients gives the one-process gradient (1,438 samples: no padding)
    spec = {**SPEC, "optimizer": {"name": "sgd", "lr": 0.05}, "batch_size": 32}
    alone = {key: value for key, value in spec.items() if key != "distributed"}
    with TrainbusClient(server.url, server.token) as client:
        ids = [client.submit(spec)["id"], client.submit({**alone, "batch_size": 64})["id"]]
        records = [wait_job(client, job_id, ENDED) for job_id in ids]
        assert [r["state"] for r in records] == ["completed", "completed"], records
        weights = [
            torch.load(
                client.download_checkpoint(r["id"], r["checkpoint"], tmp_path / r["id"]),
                weights_only=True,
            )["model"]
            for r in records
        ]
    assert records[0]["step"] == records[1]["step"]
    for name, tensor in weights[1].items():
        assert torch.allclose(weights[0][name], tensor, atol=1e-5), name


def test_a_stopped_two_rank_job_resumed_ends_with_the_weights_of_one_never_stopped(
    server: LiveServer, tmp_path: Path
) -> None:
    spec = {**SPEC, "epochs": 6, "batch_size": 16}
    with TrainbusClient(server.url, server.token) as client:
        straight = client.submit(spec)["id"]
        interrupted = client.submit(spec)["id"]
        wait_job(client, interrupted, {"running"}, past_step=3)
        client.stop(interrupted)
        stopped = wait_job(client, interrupted, ENDED)
        assert stopped["state"] == "stopped", stopped
        client.resume(interrupted)
        records = [wait_job(client, job, ENDED) for job in (straight, interrupted)]
        assert [r["state"] for r in records] == ["completed", "completed"], records
        assert 0 < stopped["step"] < records[1]["step"] == records[0]["step"]
        weights = [
            torch.load(
                client.download_checkpoint(r["id"], r["checkpoint"], tmp_path / r["id"]),
                weights_only=True,
            )["model"]
            for r in records
        ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def _running(pid: int) -> bool:
    try:
        return _alive(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _alive(process: psutil.Process) -> bool:
    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize(
    ("killed", "says"),
    [
        ("rank 1", "rank 1 of 2 (pid"),
        ("rank 0", "rank 0 of 2 (pid"),  # the job's own worker
        ("agent", "the worker process was killed by SIGKILL"),
    ],
)
def test_a_killed_rank_or_agent_fails_the_job_naming_it_and_leaves_no_process(
    server: LiveServer, data_dir: Path, killed: str, says: str
) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(LONG)["id"]
        wait_job(client, job_id, {"running"}, past_step=3)
        agent = _agent(server, job_id)
        ranks = [_rank_process(data_dir, job_id, rank) for rank in (0, 1)]
        assert {rank.pid for rank in ranks} == {child.pid for child in agent.children()}
        _wait_rank_metrics(client, job_id)
        job_processes = [agent, *ranks]
        victim = agent if killed == "agent" else ranks[int(killed[-1])]
        victim.send_signal(signal.SIGKILL)
        record = wait_job(client, job_id, ENDED)
    assert record["state"] == "failed", record
    message = record["error"]["message"]
    assert says in message and "SIGKILL" in message, record["error"]
    deadline = time.monotonic() + 10
    while any(_alive(process) for process in job_processes):
        assert time.monotonic() < deadline, job_processes
        time.sleep(0.05)  # polling interval, bounded by the deadline
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


@pytest.mark.parametrize(
    ("distributed", "extra", "says"),
    [
        # too short for a host's agent to start
        ({"nproc_per_node": 1, "nnodes": 2, "join_timeout_seconds": 1}, {}, "greater than or"),
        ({"nproc_per_node": 2}, {"devices": 3}, "one device slot per rank (2)"),
        ({"nproc_per_node": 2, "backend": "nccl"}, {"device": "cpu"}, "'nccl' needs CUDA"),
        ({"nproc_per_node": 3}, {}, "asks for 3 cpu slots, but this server has 2"),
        ({"nproc_per_node": 0}, {}, "greater than or equal to 1"),
        # shorter than a checkpoint may take between two batches
        ({"nproc_per_node": 2, "collective_timeout_seconds": 1}, {}, "greater than or equal to 5"),
    ],
)
def test_a_distributed_section_the_server_cannot_run_is_refused_with_what_to_fix(
    server: LiveServer, distributed: dict[str, Any], extra: dict[str, Any], says: str
) -> None:
    with (
        TrainbusClient(server.url, server.token) as client,
        pytest.raises(HTTPStatusError) as refused,
    ):
        client.submit({**SPEC, **extra, "distributed": distributed})
    assert refused.value.status == 422
    assert says in str(refused.value.detail)


def test_a_server_that_runs_jobs_on_threads_refuses_a_distributed_job(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", run_jobs_in="thread", devices=["cpu:2"])
    with (
        run_server(create_app(settings), settings) as live,
        TrainbusClient(live.url, live.token) as client,
        pytest.raises(HTTPStatusError) as refused,
    ):
        client.submit(SPEC)
    assert refused.value.status == 422
    assert "run_jobs_in: use 'process'" in str(refused.value.detail)


def test_a_server_that_shuts_down_interrupts_a_distributed_job_which_resumes_after(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    spec = {**LONG, "epochs": 8}
    settings = make_settings(data, run_jobs_in="process", devices=["cpu:2"])
    with (
        run_server(create_app(settings), settings) as live,
        TrainbusClient(live.url, live.token) as client,
    ):
        job_id = client.submit(spec)["id"]
        wait_job(client, job_id, {"running"}, past_step=3)
        agent = _agent(live, job_id)
        job_processes = [agent, *(_rank_process(data, job_id, rank) for rank in (0, 1))]
    # every rank saved and ended with the server: nothing of the job is left
    assert not any(_alive(process) for process in job_processes)
    shutdown = [
        [(e["applied"], e["step"]) for e in _rank_records(data, job_id, r) if "applied" in e]
        for r in (0, 1)
    ]
    assert shutdown[0] == shutdown[1] and [kind for kind, _ in shutdown[0]] == ["pause"]
    settings = make_settings(data, run_jobs_in="process", devices=["cpu:2"])
    with (
        run_server(create_app(settings), settings) as live,
        TrainbusClient(live.url, live.token) as client,
    ):
        assert client.job(job_id)["state"] == "interrupted"
        client.resume(job_id)
        record = wait_job(client, job_id, ENDED)
    assert record["state"] == "completed", record
    assert record["epoch"] == spec["epochs"]
