"""Device slots through a real server whose jobs run in worker processes: two simulated CUDA
devices, two jobs that each hold one and see only it, a third that waits for one with the
reason in its record, a CPU job that sees none; each worker's CPU and memory in the resource
samples and on /metrics, labelled by job."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import HTTPStatusError, TrainbusClient, create_app

LONG = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 500, "batch_size": 16}
SHORT = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 2}
ENDED = {"completed", "stopped", "failed", "interrupted"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("data"),
        run_jobs_in="process",
        max_running_jobs=3,  # CPU slots: 3 (auto)
        simulated_cuda_devices=2,
        resource_interval_seconds=0.25,
        stop_grace_seconds=5.0,
    )
    with run_server(create_app(settings), settings) as live:
        yield live


def _until(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval, bounded by the deadline
    return value


def _state(client: TrainbusClient, job_id: str, states: set[str]) -> dict[str, Any]:
    return _until(  # type: ignore[no-any-return]
        f"job {job_id} to be {states}",
        lambda: (record := client.job(job_id))["state"] in states and record,
    )


def _worker_start(client: TrainbusClient, job_id: str) -> dict[str, Any]:
    """What the job's worker process reports of itself as it starts training."""
    events = _until(
        f"job {job_id}'s pretrain_routine_start",
        lambda: client.events(job_id, types="pretrain_routine_start"),
    )
    return events[-1]["data"]  # type: ignore[no-any-return]


def _worker_pid(server: LiveServer, job_id: str) -> int:
    supervisor = server.services.jobs.manager.supervisor  # type: ignore[attr-defined]
    run = _until(
        f"job {job_id}'s worker",
        lambda: (run := supervisor.runs.get(job_id)) is not None and run.process and run,
    )
    return int(run.process.pid)


def test_jobs_hold_devices_see_only_theirs_and_wait_for_one_with_a_reason(
    server: LiveServer,
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        first, second = client.submit(LONG)["id"], client.submit(LONG)["id"]
        held = {
            job_id: _state(client, job_id, {"running"})["devices"] for job_id in (first, second)
        }
        assert sorted(held.values()) == [["cuda:0"], ["cuda:1"]], held
        seen = {job_id: _worker_start(client, job_id) for job_id in (first, second)}
        cores = server.services.jobs.manager.devices.cores  # type: ignore[attr-defined]
        # each worker sees its own device, numbered as CUDA numbers them
        visible = {job_id: seen[job_id]["cuda_visible_devices"] for job_id in seen}
        assert visible == {job_id: held[job_id][0].removeprefix("cuda:") for job_id in held}
        # simulated devices train on the CPU; each worker has its share of the cores
        assert {start["device"] for start in seen.values()} == {"cpu"}
        assert {start["torch_threads"] for start in seen.values()} == {max(1, cores // 2)}

        third = client.submit(LONG)["id"]
        record = client.job(third)
        assert record["state"] == "queued" and record.get("devices") is None
        assert record["waiting_for"].startswith("1 cuda device (0 free of 2; "), record
        assert f"held by {first}" in record["waiting_for"]
        assert f"held by {second}" in record["waiting_for"]

        # a CPU job is not held up by the CUDA queue, and cannot see any GPU
        cpu_job = client.submit({**SHORT, "device": "cpu"})["id"]
        cpu_start = _worker_start(client, cpu_job)
        assert cpu_start["cuda_visible_devices"] == ""
        assert cpu_start["torch_threads"] == max(1, cores // 3)  # 1 of 3 CPU slots
        assert _state(client, cpu_job, ENDED)["state"] == "completed"
        assert client.job(third)["state"] == "queued"

        # the third starts on the device the first gives back
        client.stop(first)
        assert _state(client, first, ENDED)["state"] == "stopped"
        assert _state(client, third, {"running"})["devices"] == held[first]
        assert _worker_start(client, third)["cuda_visible_devices"] == visible[first]
        started = client.events(third, types="job_started")
        assert started[-1]["data"]["devices"] == held[first]
        for job_id in (second, third):
            client.stop(job_id)
        for job_id in (second, third):
            assert _state(client, job_id, ENDED)["state"] == "stopped"
            assert client.job(job_id).get("devices") is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": 3}, "asks for 3 cuda devices, but this server has 2 in all"),
        ({"device": "cpu", "devices": 4}, "asks for 4 cpu slots, but this server has 3 in all"),
    ],
)
def test_more_devices_than_the_server_has_is_refused_at_submit(
    server: LiveServer, fields: dict[str, Any], message: str
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        before = client.jobs()["total"]
        with pytest.raises(HTTPStatusError) as refused:
            client.submit({**SHORT, **fields})
        assert client.jobs()["total"] == before  # no job was made
    assert refused.value.status == 422
    assert message in str(refused.value.detail), refused.value.detail


def test_each_worker_is_sampled_and_exported_by_job(server: LiveServer) -> None:
    with TrainbusClient(server.url, server.token) as client:
        jobs = [client.submit({**LONG, "device": "cpu"})["id"] for _ in range(2)]
        pids = {job_id: _worker_pid(server, job_id) for job_id in jobs}
        for job_id in jobs:
            _worker_start(client, job_id)  # training: its model and data are loaded
        bus = server.services.bus

        def sample_with_both() -> dict[str, Any] | None:
            after = max(0, bus.last_seq("_server") - 3)
            for event in reversed(client.events("_server", after_seq=after)):
                workers = {w["job_id"]: w for w in event["data"].get("workers", [])}
                # a sample taken as a worker was forked may see no CPU time yet: a later one
                if set(jobs) <= set(workers) and all(workers[j]["cpu_seconds"] > 0 for j in jobs):
                    return workers
            return None

        workers = _until("a resource sample listing both workers", sample_with_both)
        for job_id in jobs:
            worker = workers[job_id]
            assert worker["pid"] == pids[job_id]
            assert worker["rss_bytes"] > 50_000_000  # torch, a model and a dataset
            assert worker["cpu_seconds"] > 0 and worker["cpu_percent"] >= 0
            assert worker["gpu_memory_bytes"] is None and worker["gpus"] == []  # no NVML
        text = _until(
            "both workers on /metrics",
            lambda: all(f'job_id="{j}"' in (t := client.metrics()) for j in jobs) and t,
        )
        for job_id in jobs:
            assert f'trainbus_job_resident_memory_bytes{{job_id="{job_id}"}}' in text
            assert f'trainbus_job_cpu_seconds_total{{job_id="{job_id}"}}' in text
        for job_id in jobs:
            client.stop(job_id)
        for job_id in jobs:
            _state(client, job_id, ENDED)
        _until(
            "the ended workers to leave /metrics",
            lambda: "trainbus_job_resident_memory_bytes{" not in client.metrics(),
        )
