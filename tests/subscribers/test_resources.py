"""The resource monitor: psutil for real, NVML through a fake ``pynvml`` module."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from trainbus.bus import Event, EventBus, EventType
from trainbus.subscribers import PrometheusExporter, ResourceMonitor


class _NotSupported(Exception):
    pass


class FakeNVML:
    """Two GPUs; the second cannot report its power (as some boards cannot)."""

    NVML_TEMPERATURE_GPU = 0

    def __init__(self) -> None:
        self.initialised = 0
        self.shutdown = 0

    def nvmlInit(self) -> None:
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.shutdown += 1

    def nvmlDeviceGetCount(self) -> int:
        return 2

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetName(self, handle: int) -> bytes:
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle: int) -> str:
        return f"GPU-{handle:04d}"

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> Any:
        return SimpleNamespace(gpu=90 - handle * 40, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> Any:
        return SimpleNamespace(used=(handle + 1) * 2**30, free=2**30, total=80 * 2**30)

    def nvmlDeviceGetTemperature(self, handle: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return 60 + handle

    def nvmlDeviceGetPowerUsage(self, handle: int) -> int:
        if handle == 1:
            raise _NotSupported("not supported")
        return 312_500  # milliwatts


def test_psutil_figures_for_real() -> None:
    monitor = ResourceMonitor(bus=EventBus(), nvml=_no_gpu())
    sample = monitor.sample()
    assert sample["rss_bytes"] > 10_000_000
    assert sample["process_cpu_percent"] >= 0.0
    assert 0.0 <= sample["system_cpu_percent"] <= 100.0
    assert sample["gpus"] == []


def _no_gpu() -> Any:
    def fail() -> None:
        raise RuntimeError("NVML Shared Library Not Found")

    return SimpleNamespace(nvmlInit=fail)


def test_no_gpu_is_said_once(caplog: pytest.LogCaptureFixture) -> None:
    monitor = ResourceMonitor(bus=EventBus(), nvml=_no_gpu())
    with caplog.at_level(logging.INFO, logger="trainbus.subscribers"):
        for _ in range(3):
            assert monitor.sample()["gpus"] == []
    assert len([r for r in caplog.records if "NVML" in r.getMessage()]) == 1


def test_nvml_through_an_injected_pynvml_module(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeNVML()
    monkeypatch.setitem(sys.modules, "pynvml", fake)  # the import path the server uses
    monitor = ResourceMonitor(bus=EventBus())
    first, second = monitor.sample()["gpus"]
    assert first == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-0000",
        "utilization_ratio": 0.9,
        "memory_used_bytes": 2**30,
        "memory_total_bytes": 80 * 2**30,
        "temperature_celsius": 60.0,
        "power_watts": 312.5,
        "torch_allocated_bytes": None,  # CUDA never initialised here
        "torch_reserved_bytes": None,
    }
    assert second["power_watts"] is None and second["utilization_ratio"] == 0.5
    monitor.sample()
    assert fake.initialised == 1
    monitor.close()
    assert fake.shutdown == 1


async def test_run_publishes_samples_until_cancelled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML())
    async with EventBus() as bus:
        monitor = ResourceMonitor(bus=bus, interval_seconds=0.01)
        async with (
            bus.subscribe("t", types=[EventType.RESOURCE_SAMPLE]) as sub,
            anyio.create_task_group() as group,
        ):
            group.start_soon(monitor.run)
            with anyio.fail_after(10):
                events = [await sub.receive() for _ in range(3)]
            group.cancel_scope.cancel()
    assert {e.job_id for e in events} == {"_server"}
    assert [e.seq for e in events] == [1, 2, 3]
    assert len(events[0].data["gpus"]) == 2


async def test_a_failing_sample_is_reported_and_retried_not_fatal(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Out of file descriptors, psutil raises EMFILE: the monitor (and the server's task group
    that runs it) must live on, report it, and sample again once it can."""
    import errno

    async with EventBus() as bus:
        monitor = ResourceMonitor(bus=bus, interval_seconds=0.01, nvml=_no_gpu())
        real_sample = monitor.sample
        failures_left = 2

        def sample() -> dict[str, Any]:
            nonlocal failures_left
            if failures_left:
                failures_left -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return real_sample()

        monkeypatch.setattr(monitor, "sample", sample)
        async with (
            bus.subscribe(
                "t", types=[EventType.RESOURCE_SAMPLE, EventType.SUBSCRIBER_ERROR]
            ) as sub,
            anyio.create_task_group() as group,
        ):
            group.start_soon(monitor.run)
            with anyio.fail_after(10):
                events = [await sub.receive() for _ in range(3)]
            group.cancel_scope.cancel()
    assert [e.type for e in events] == [
        EventType.SUBSCRIBER_ERROR,
        EventType.SUBSCRIBER_ERROR,
        EventType.RESOURCE_SAMPLE,
    ]
    assert events[0].data["subscriber"] == "resource_monitor"
    assert events[0].data["error_type"] == "OSError"
    assert monitor.failures == 2


# -- each job's worker process -------------------------------------------------------------


class FakeNVMLWithProcesses(FakeNVML):
    """GPU 0 runs this process (2 GiB) and a stranger; GPU 1 runs ``child`` (1 GiB)."""

    def __init__(self, child: int) -> None:
        super().__init__()
        self.child = child

    def nvmlDeviceGetComputeRunningProcesses(self, handle: int) -> list[Any]:
        if handle == 0:
            return [
                SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * 2**30),
                SimpleNamespace(pid=1, usedGpuMemory=5 * 2**30),  # not a worker
            ]
        return [SimpleNamespace(pid=self.child, usedGpuMemory=2**30)]


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_each_worker_is_sampled_with_its_gpu_memory_by_pid(
    monkeypatch: pytest.MonkeyPatch, child: subprocess.Popen[bytes]
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVMLWithProcesses(child.pid))
    pids = {"job-a": os.getpid(), "job-b": child.pid, "job-gone": _ended_pid()}
    monitor = ResourceMonitor(bus=EventBus(), workers=lambda: pids)
    workers = {worker["job_id"]: worker for worker in monitor.sample()["workers"]}
    assert set(workers) == {"job-a", "job-b"}  # an ended worker is left out
    mine, other = workers["job-a"], workers["job-b"]
    assert mine["pid"] == os.getpid() and mine["rss_bytes"] > 10_000_000
    assert mine["gpu_memory_bytes"] == 2 * 2**30
    assert mine["gpus"] == [{"index": 0, "memory_used_bytes": 2 * 2**30}]
    assert other["gpu_memory_bytes"] == 2**30
    assert other["gpus"] == [{"index": 1, "memory_used_bytes": 2**30}]
    # the first sample's CPU share is over the process's life; the next, since the last
    assert mine["cpu_seconds"] > 0 and mine["cpu_percent"] is not None
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        pass  # CPU time for the next sample to see
    again = {worker["job_id"]: worker for worker in monitor.sample()["workers"]}["job-a"]
    # /proc counts in clock ticks (10 ms), so a margin of a few
    assert again["cpu_seconds"] >= mine["cpu_seconds"] + 0.25
    assert again["cpu_percent"] > 0


def test_without_nvml_a_worker_has_cpu_and_memory_and_no_gpu_figure() -> None:
    monitor = ResourceMonitor(bus=EventBus(), nvml=_no_gpu(), workers=lambda: {"j": os.getpid()})
    (worker,) = monitor.sample()["workers"]
    assert worker["gpu_memory_bytes"] is None and worker["gpus"] == []
    assert worker["rss_bytes"] > 10_000_000


def test_the_exporter_labels_each_workers_figures_by_job() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    workers = [
        {"job_id": "a", "pid": 10, "cpu_seconds": 81.5, "cpu_percent": 98.0,
         "rss_bytes": 1_200_000_000, "gpu_memory_bytes": 3 * 2**30,
         "gpus": [{"index": 0, "memory_used_bytes": 2**30},
                  {"index": 1, "memory_used_bytes": 2 * 2**30}]},
        {"job_id": "b", "pid": 11, "cpu_seconds": 2.0, "cpu_percent": None,
         "rss_bytes": 300_000_000, "gpu_memory_bytes": None, "gpus": []},
    ]  # fmt: skip
    sample = {"system_cpu_percent": 50.0, "gpus": [], "workers": workers}
    exporter.observe([Event("_server", 1, EventType.RESOURCE_SAMPLE, 1.0, sample)])
    text = exporter.render().decode()
    assert 'trainbus_job_cpu_seconds_total{job_id="a"} 81.5' in text
    assert 'trainbus_job_resident_memory_bytes{job_id="b"} 3e+08' in text
    assert 'trainbus_job_gpu_memory_bytes{gpu="1",job_id="a"} 2.147483648e+09' in text
    assert 'trainbus_job_gpu_memory_bytes{gpu="0",job_id="b"}' not in text
    # a worker no longer listed has ended: its series go
    later = {**sample, "workers": workers[1:]}
    exporter.observe([Event("_server", 2, EventType.RESOURCE_SAMPLE, 2.0, later)])
    text = exporter.render().decode()
    assert 'job_id="a"' not in text and 'trainbus_job_cpu_seconds_total{job_id="b"} 2.0' in text


_AGENT = """
import subprocess, sys, time
ranks = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in "01"]
print(" ".join(str(rank.pid) for rank in ranks), flush=True)
time.sleep(60)
"""


@pytest.fixture
def agent() -> Iterator[tuple[int, list[int]]]:
    """A process that starts two ranks, as torch's elastic agent does: its pid and theirs."""
    process = subprocess.Popen(
        [sys.executable, "-c", _AGENT], stdout=subprocess.PIPE, start_new_session=True
    )
    assert process.stdout is not None
    ranks = [int(pid) for pid in process.stdout.readline().split()]
    yield process.pid, ranks
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    process.stdout.close()


def test_a_distributed_job_s_ranks_are_sampled_each_by_rank(
    monkeypatch: pytest.MonkeyPatch, agent: tuple[int, list[int]]
) -> None:
    agent_pid, (rank_0, rank_1) = agent
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVMLWithProcesses(rank_1))
    monitor = ResourceMonitor(
        bus=EventBus(),
        workers=lambda: {"job-d": agent_pid},
        ranks=lambda: {"job-d": {1: rank_1, 0: rank_0, 2: _ended_pid()}},
    )
    (worker,) = monitor.sample()["workers"]
    assert worker["pid"] == agent_pid
    ranks = worker["ranks"]
    # in rank order; a rank that has ended is left out
    assert [(r["rank"], r["pid"]) for r in ranks] == [(0, rank_0), (1, rank_1)]
    assert all(r["rss_bytes"] > 1_000_000 and r["cpu_seconds"] >= 0 for r in ranks)
    assert ranks[0]["gpu_memory_bytes"] == 0 and ranks[0]["gpus"] == []
    assert ranks[1]["gpus"] == [{"index": 1, "memory_used_bytes": 2**30}]


def test_a_job_that_is_not_distributed_has_no_ranks(child: subprocess.Popen[bytes]) -> None:
    monitor = ResourceMonitor(
        bus=EventBus(), nvml=_no_gpu(), workers=lambda: {"j": child.pid}, ranks=dict
    )
    (worker,) = monitor.sample()["workers"]
    assert "ranks" not in worker


def test_the_exporter_labels_each_rank_s_figures_by_job_and_rank() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    rank_1 = {"rank": 1, "pid": 21, "cpu_seconds": 40.0, "cpu_percent": 99.0,
              "rss_bytes": 700_000_000, "gpu_memory_bytes": 2**30,
              "gpus": [{"index": 1, "memory_used_bytes": 2**30}]}  # fmt: skip
    worker = {"job_id": "d", "pid": 20, "cpu_seconds": 1.0, "cpu_percent": 1.0,
              "rss_bytes": 200_000_000, "gpu_memory_bytes": None, "gpus": [],
              "ranks": [{**rank_1, "rank": 0, "pid": 22, "gpus": []}, rank_1]}  # fmt: skip
    sample = {"system_cpu_percent": 50.0, "gpus": [], "workers": [worker]}
    exporter.observe([Event("_server", 1, EventType.RESOURCE_SAMPLE, 1.0, sample)])
    text = exporter.render().decode()
    assert 'trainbus_job_cpu_seconds_total{job_id="d"} 1.0' in text
    assert 'trainbus_job_rank_cpu_seconds_total{job_id="d",rank="1"} 40.0' in text
    assert 'trainbus_job_rank_resident_memory_bytes{job_id="d",rank="0"} 7e+08' in text
    assert 'trainbus_job_rank_gpu_memory_bytes{gpu="1",job_id="d",rank="1"}' in text
    assert 'trainbus_job_rank_gpu_memory_bytes{gpu="1",job_id="d",rank="0"}' not in text
    exporter.observe(
        [Event("_server", 2, EventType.RESOURCE_SAMPLE, 2.0, {**sample, "workers": []})]
    )
    assert 'rank="' not in exporter.render().decode()  # the job ended: its ranks' series go
