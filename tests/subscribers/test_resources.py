"""The resource monitor: psutil for real, NVML through a fake ``pynvml`` module."""

from __future__ import annotations

import logging
import sys
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from trainbus.bus import EventBus, EventType
from trainbus.subscribers import ResourceMonitor


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
