"""The supervisor and its worker processes, through a real server: a worker that dies ends
its job alone, `failed` with how it died; a stop a worker does not answer escalates to
SIGTERM and SIGKILL and still ends the job `stopped`; a job whose step stands still is
reported `job_stalled` and, with ``on_stall: fail``, ended. Through a `trainbus serve` with a
plugin of faulty models: a segmentation fault, a job past its memory limit and a worker hung in
Python code each end as a person can tell, the job beside them untouched; the exporter shows
the stall; a SIGKILLed server leaves no process of its own behind."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.api.server import LiveServer, make_settings, run_server
from tests.reliability._kill_server import all_events
from tests.served import Served, serve
from tests.worker._faulty_models import install
from trainbus.api import TrainbusClient, create_app
from trainbus.api.client import HTTPStatusError
from trainbus.subscribers import verify_checkpoint
from trainbus.worker._unconfirmed import UNCONFIRMED_FILE

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

LONG = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 500,
        "batch_size": 16, "torch_threads": 1}  # fmt: skip
SHORT = {"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("data"),
        run_jobs_in="process",
        stop_grace_seconds=1.0,
        max_running_jobs=2,
        resource_interval_seconds=60.0,
    )
    with run_server(create_app(settings), settings) as live:
        yield live


def _worker_pid(server: LiveServer, job_id: str) -> int:
    supervisor = server.services.jobs.manager.supervisor  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60
    while (run := supervisor.runs.get(job_id)) is None or run.process is None:
        assert time.monotonic() < deadline, "the job's worker did not start"
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return int(run.process.pid)


def _wait(client: TrainbusClient, job_id: str, states: set[str]) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while (record := client.job(job_id))["state"] not in states:
        assert time.monotonic() < deadline, record
        time.sleep(0.02)  # polling interval, bounded by the deadline
    return record


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_killed_worker_fails_its_job_alone(server: LiveServer) -> None:
    with TrainbusClient(server.url, server.token) as client:
        doomed = client.submit(LONG)["id"]
        _wait(client, doomed, {"running"})
        pid = _worker_pid(server, doomed)
        os.kill(pid, signal.SIGKILL)
        record = _wait(client, doomed, {"failed", "completed", "stopped", "interrupted"})
        assert record["state"] == "failed", record
        assert "SIGKILL" in record["error"]["message"], record["error"]
        assert "memory" in record["error"]["message"], record["error"]  # the likely cause
        assert record["error"]["exitcode"] == -signal.SIGKILL
        # the server and its other jobs go on
        after = client.submit(SHORT)["id"]
        assert _wait(client, after, {"completed", "failed"})["state"] == "completed"


def test_a_stop_the_worker_does_not_answer_escalates_and_still_ends_stopped(
    server: LiveServer,
) -> None:
    with TrainbusClient(server.url, server.token) as client:
        job_id = client.submit(LONG)["id"]
        _wait(client, job_id, {"running"})
        pid = _worker_pid(server, job_id)
        os.kill(pid, signal.SIGSTOP)  # hung: it neither trains nor answers
        started = time.monotonic()
        client.stop(job_id)
        record = _wait(client, job_id, {"stopped", "failed", "completed", "interrupted"})
        elapsed = time.monotonic() - started
    assert record["state"] == "stopped", record
    assert "grace period" in (record["stop_reason"] or ""), record
    # the server's own SIGKILL: no guess at the kernel's out-of-memory killer
    assert "ended by SIGKILL, sent by the server" in record["stop_reason"], record
    # SIGTERM after 1 s of grace cannot run in a stopped process; SIGKILL after 1 s more
    assert elapsed < 10, elapsed
    deadline = time.monotonic() + 10
    while not _gone(pid):
        assert time.monotonic() < deadline, "the worker outlived its stop"
        time.sleep(0.05)  # polling interval, bounded by the deadline


def test_a_stalled_job_is_reported_and_failed_with_on_stall_fail(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "data", run_jobs_in="process",
                             resource_interval_seconds=60.0)  # fmt: skip
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
    ):
        spec = {**LONG, "stall_timeout_seconds": 1.0, "on_stall": "fail"}
        job_id = client.submit(spec)["id"]
        _wait(client, job_id, {"running"})
        pid = _worker_pid(server, job_id)
        os.kill(pid, signal.SIGSTOP)  # its step stops moving, and so do its heartbeats
        record = _wait(client, job_id, {"failed", "stopped", "completed", "interrupted"})
        stalled = client.events(job_id, types="job_stalled")
    assert record["state"] == "failed", record
    assert "stalled" in record["error"]["message"], record["error"]
    assert "sent by the server" in record["error"]["message"], record["error"]
    assert stalled and isinstance(stalled[0]["data"].get("step"), int), stalled
    # a stopped process cannot write its stack (faulthandler runs in it): the field is there,
    # empty; a process hung in Python code fills it
    assert stalled[0]["data"]["action"] == "fail" and "stack" in stalled[0]["data"]


# -- faults inside the worker, through a `trainbus serve` that has a plugin of faulty models --

WORKER_LIMIT = 6 * 2**30


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    site = install(tmp_path_factory.mktemp("site"))
    with serve(
        tmp_path_factory.mktemp("served"),
        site,
        stop_grace_seconds="1",
        max_running_jobs="2",
        resource_interval_seconds="60",
        worker_memory_limit_bytes=str(WORKER_LIMIT),
        simulated_cuda_devices="1",  # a job on it sees a CUDA device, and trains on the CPU
    ) as server:
        yield server


def _faulty(name: str, epochs: int = 50, **params: Any) -> dict[str, Any]:
    return {"model": {"name": name, "params": params}, "dataset": {"name": "iris"},
            "epochs": epochs, "batch_size": 16, "torch_threads": 1, "device": "cpu"}  # fmt: skip


def _ended(client: TrainbusClient, job_id: str) -> dict[str, Any]:
    return _wait(client, job_id, {"failed", "completed", "stopped", "interrupted"})


def test_a_segfaulting_worker_fails_its_job_alone_saying_where(served: Served) -> None:
    with served.client() as client:
        neighbour = client.submit(LONG)["id"]
        _wait(client, neighbour, {"running"})
        crashed = _ended(client, client.submit(_faulty("segfaulting", after_steps=5))["id"])
        assert crashed["state"] == "failed", crashed
        error = crashed["error"]
        assert error["exitcode"] == -signal.SIGSEGV, error
        assert "killed by SIGSEGV (a segmentation fault in native code)" in error["message"]
        # faulthandler's report names the Python code that was running when it crashed: the
        # message its innermost call, the report the whole stack of the crashed thread
        assert error["message"].endswith("in string_at"), error["message"]
        report = error["fatal_error"]
        assert report.startswith("Fatal Python error: Segmentation fault"), report
        assert "_faulty_models.py" in report and "in fault" in report, report
        # the server and the job beside it go on
        step = client.job(neighbour)["step"]
        deadline = time.monotonic() + 30
        while client.job(neighbour)["step"] <= step:
            assert time.monotonic() < deadline, "the other job stopped training"
            time.sleep(0.05)  # polling interval, bounded by the deadline
        assert client.job(neighbour)["state"] == "running"
        client.stop(neighbour)
        assert _ended(client, neighbour)["state"] == "stopped"


def test_a_job_past_its_memory_limit_fails_naming_the_limit(served: Served) -> None:
    """The server's worker_memory_limit_bytes bounds every worker; a job's memory_limit_mb
    may ask for less. A normal job's worker maps about 1.3 GiB (torch included)."""
    with served.client() as client:
        own = client.submit(
            {**_faulty("memory_hungry", after_steps=2, mib_per_step=256), "memory_limit_mb": 3072}
        )["id"]
        server_wide = client.submit(_faulty("memory_hungry", after_steps=2, mib_per_step=256))["id"]
        for job_id, mib in ((own, 3072), (server_wide, WORKER_LIMIT // 2**20)):
            record = _ended(client, job_id)
            assert record["state"] == "failed", record
            error = record["error"]
            assert error["type"] == "MemoryLimitExceeded", error
            assert error["message"].startswith(
                f"the job exceeded its memory limit of {mib} MiB (DefaultCPUAllocator"
            ), error["message"]
            assert error["memory_limit_bytes"] == mib * 2**20
        too_small = {**_faulty("memory_hungry"), "memory_limit_mb": 100}
        with pytest.raises(HTTPStatusError) as refused:
            client.submit(too_small)
        assert refused.value.status == 422 and "memory_limit_mb" in str(refused.value.detail)
        # a normal job under the same limit is not touched by it
        fine = client.submit(_faulty("memory_hungry", epochs=2, after_steps=10_000))["id"]
        assert _ended(client, fine)["state"] == "completed"


def test_a_cuda_job_s_worker_has_no_address_space_limit(served: Served) -> None:
    """The CUDA driver reserves far more address space than it uses: under a limit it would
    not start. The job maps 3.5 GiB past its start, above the limit it asks for."""
    spec = {**_faulty("memory_hungry", epochs=2, after_steps=2, mib_per_step=256),
            "device": "auto", "memory_limit_mb": 3072}  # fmt: skip
    with served.client() as client:
        job_id = client.submit(spec)["id"]
        record = _ended(client, job_id)
        (started,) = client.events(job_id, types="job_started")
    assert started["data"]["devices"] == ["cuda:0"], started
    assert record["state"] == "completed", record


def _stalled_metric(served: Served, job_id: str) -> tuple[float, float]:
    values = {}
    for line in served.metrics().splitlines():
        for name in ("trainbus_job_stalled", "trainbus_job_stalls_total"):
            if line.startswith(f'{name}{{job_id="{job_id}"}} '):
                values[name] = float(line.split()[-1])
    return values.get("trainbus_job_stalled", -1.0), values.get("trainbus_job_stalls_total", -1.0)


def test_a_worker_hung_in_python_code_is_reported_with_its_stack_and_goes_on(
    served: Served,
) -> None:
    # the worker reports its step once a second: a stall is seen a second or two late, and
    # the hang lasts long enough for the exporter's gauge to be seen up on a loaded machine
    spec = {**_faulty("hanging", epochs=500, after_steps=3, hang_seconds=7.0),
            "stall_timeout_seconds": 1.5, "on_stall": "warn"}  # fmt: skip
    with served.client() as client:
        job_id = client.submit(spec)["id"]
        deadline = time.monotonic() + 60
        while not (stalled := _hung_at(client, job_id, step=3)):
            assert time.monotonic() < deadline, client.job(job_id)
            time.sleep(0.05)  # polling interval, bounded by the deadline
        while _stalled_metric(served, job_id)[0] != 1.0:  # the exporter follows a bit late
            assert time.monotonic() < deadline, _stalled_metric(served, job_id)
            time.sleep(0.05)  # polling interval, bounded by the deadline
        # warn: it goes on once the hang is over, and the gauge falls back
        while _stalled_metric(served, job_id)[0] != 0.0:
            assert time.monotonic() < deadline, _stalled_metric(served, job_id)
            time.sleep(0.05)  # polling interval, bounded by the deadline
        record = client.job(job_id)
        assert record["state"] == "running" and record["step"] > 3, record
        client.stop(job_id)
        assert _ended(client, job_id)["state"] == "stopped"
        now_stalled, stalls = _stalled_metric(served, job_id)
        assert now_stalled == 0.0 and stalls >= 1.0, (now_stalled, stalls)
    data = stalled["data"]
    assert data["action"] == "warn", data
    assert data["stalled_for_seconds"] >= 1.0
    # faulthandler's stack of the training thread, innermost call first
    assert "in spin_in_python_code" in data["stack"], data["stack"]
    assert "in forward" in data["stack"].split("in spin_in_python_code", 1)[1]


def _hung_at(client: TrainbusClient, job_id: str, step: int) -> dict[str, Any] | None:
    """The job's ``job_stalled`` event at ``step`` (a slow start may be reported at step 0)."""
    events = client.events(job_id, types="job_stalled")
    return next((event for event in events if event["data"]["step"] == step), None)


def test_a_worker_hung_in_python_code_can_still_be_stopped(served: Served) -> None:
    spec = {**_faulty("hanging", after_steps=3, hang_seconds=600.0),
            "stall_timeout_seconds": 1.5, "on_stall": "warn"}  # fmt: skip
    with served.client() as client:
        job_id = client.submit(spec)["id"]
        deadline = time.monotonic() + 60
        while not _hung_at(client, job_id, step=3):
            assert time.monotonic() < deadline, client.job(job_id)
            time.sleep(0.05)  # polling interval, bounded by the deadline
        assert client.job(job_id)["state"] == "running"  # warn: it is left to run
        client.stop(job_id)
        record = _ended(client, job_id)
    assert record["state"] == "stopped", record
    assert "did not stop within the grace period" in record["stop_reason"], record


def test_no_worker_outlives_a_killed_server(tmp_path: Path) -> None:
    with serve(tmp_path / "data", max_running_jobs="2", resource_interval_seconds="60") as server:
        with server.client() as client:
            # the first jobs of a server wait for its fork server to import torch (seconds):
            # that is no stall, however short stall_timeout_seconds is
            watched = {**LONG, "stall_timeout_seconds": 1.5, "on_stall": "fail"}
            jobs = [client.submit(watched)["id"] for _ in range(2)]
            deadline = time.monotonic() + 60
            while min(client.job(job_id)["step"] for job_id in jobs) == 0:  # both train
                assert time.monotonic() < deadline, [client.job(job_id) for job_id in jobs]
                time.sleep(0.05)  # polling interval, bounded by the deadline
            assert not any(client.events(job_id, types="job_stalled") for job_id in jobs)
        # the fork server, its two workers, multiprocessing's resource tracker
        started_under_it = server.descendants()
        assert len(started_under_it) >= 3, [p.cmdline() for p in started_under_it]
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(timeout=10)
        killed = time.monotonic()
        while alive := [p for p in started_under_it if _running(p)]:
            assert time.monotonic() - killed < 2.0, f"outlived the server by 2 s: {alive}"
            time.sleep(0.02)  # polling interval, bounded by the deadline
    logs = [(tmp_path / "data" / "jobs" / job_id / "worker.log").read_text() for job_id in jobs]
    assert all("the server (pid" in log and "is gone; the worker ends" in log for log in logs)
    # No completed step is lost: each worker ended its run at a batch boundary with its state
    # saved, and the next server stores the events no server had confirmed before it marks
    # the job interrupted; the resume starts at the step the stream ends with.
    with (
        serve(tmp_path / "data", resource_interval_seconds="60") as server,
        server.client() as client,
    ):
        for job_id in jobs:
            job_dir = tmp_path / "data" / "jobs" / job_id
            assert not (job_dir / UNCONFIRMED_FILE).exists()
            record = client.job(job_id)
            assert record["state"] == "interrupted", record
            events = all_events(client, job_id)
            for before, event in zip([{"seq": 0}, *events], events, strict=False):
                if event["seq"] != before["seq"] + 1:  # only seqs the crash left unused
                    assert event["type"] == "gap", f"seqs from {before['seq'] + 1} are missing"
            steps = [e["data"]["step"] for e in events if e["type"] == "train_batch_end"]
            assert steps == list(range(1, len(steps) + 1)), "a step is missing or repeated"
            assert events[-1]["type"] == "job_interrupted"
            assert verify_checkpoint(job_dir, "latest").step == steps[-1] == record["step"]
        resumed = jobs[0]
        history = all_events(client, resumed)
        ended_at = [e["data"]["step"] for e in history if e["type"] == "train_batch_end"][-1]
        client.resume(resumed)
        deadline = time.monotonic() + 60
        after = history[-1]["seq"]
        while not (starts := client.events(resumed, after_seq=after, types="train_start")):
            assert time.monotonic() < deadline, client.job(resumed)
            time.sleep(0.05)  # polling interval, bounded by the deadline
        assert starts[0]["data"]["step"] == ended_at
        client.stop(resumed)
        assert client.wait(resumed, timeout=60)["state"] == "stopped"


def _running(process: psutil.Process) -> bool:
    """Not ended (a zombie has ended: it waits only for an adoptive parent to reap it)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
