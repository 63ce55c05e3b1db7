"""The resource monitor: GPUs through NVML, torch's CUDA allocator, CPU and memory (psutil), for
the server and for each job's worker process."""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

import anyio
import psutil

from trainbus.bus import BusClosed, EventBus, EventType

__all__ = ["ResourceMonitor"]

logger = logging.getLogger(__name__)

WorkerPids = Callable[[], Mapping[str, int]]
"""``job_id -> pid`` of each job's running worker process (the API wires the supervisor's)."""
RankPids = Callable[[], Mapping[str, Mapping[int, int]]]
"""``job_id -> rank -> pid`` of the ranks of each running distributed job."""

SERVER_JOB_ID = "_server"
MAX_BACKOFF_SECONDS = 300.0
"""The longest wait between two tries after consecutive failed samples."""


class ResourceMonitor:
    """Samples the machine every ``interval_seconds`` and publishes ``resource_sample``.

    Not a subscriber: a task the server runs for its lifetime::

        async with anyio.create_task_group() as tg:
            tg.start_soon(monitor.run)      # samples until cancelled
            ...
            tg.cancel_scope.cancel()

    Each sample is taken on a worker thread (NVML and psutil calls block) and published with
    ``await bus.publish_async`` under ``job_id`` (``"_server"`` by default). Its data::

        {"process_cpu_percent": 37.5,     # this process, percent of one core (may pass 100)
         "system_cpu_percent": 20.1,      # the whole machine, 0..100
         "rss_bytes": 512000000,          # this process's resident memory
         "gpus": [{"index": 0, "name": "...", "uuid": "GPU-...",
                   "utilization_ratio": 0.93,        # DCGM_FI_DEV_GPU_UTIL / 100
                   "memory_used_bytes": ..., "memory_total_bytes": ...,  # DCGM_FI_DEV_FB_USED,
                                                     # FB_USED + FB_FREE, in bytes, not MiB
                   "temperature_celsius": 61,        # DCGM_FI_DEV_GPU_TEMP
                   "power_watts": 312.5,             # DCGM_FI_DEV_POWER_USAGE
                   "torch_allocated_bytes": ..., "torch_reserved_bytes": ...}],
         "workers": [{"job_id": "3f2a9c1b7d4e", "pid": 4242,   # with ``workers`` only
                      "cpu_seconds": 81.5,        # user + system, since the worker started
                      "cpu_percent": 98.0,        # since the last sample (the first: since
                                                  # it started); percent of one core
                      "rss_bytes": 1200000000,    # resident memory
                      "gpu_memory_bytes": 3221225472,   # on all GPUs, NVML's figure for its
                                                        # pid (None: no NVML, or none given)
                      "gpus": [{"index": 0, "memory_used_bytes": 3221225472}],
                      "ranks": [{"rank": 0, "pid": 4250, ...}]}]}  # a distributed job's:
                                  # each rank's figures as its worker's (the elastic agent)

    A worker's GPU memory is matched by pid in ``nvmlDeviceGetComputeRunningProcesses``
    (``None`` without NVML, or where the driver cannot say); NVML lists the host's pids, so a
    server in a container needs the host's pid namespace (``pid: host``) for these to match,
    else they read 0. A worker that ends between the listing and its
    reading is left out of that sample.

    A figure NVML cannot give is ``None``. Without NVML (no ``nvidia-ml-py``, no driver, no
    GPU) the monitor logs that once and publishes CPU and memory only. The torch allocator
    figures are read only once this process has initialised CUDA (reading them must not
    create a CUDA context).

    A sample that fails (psutil or NVML raising, EMFILE when the process is out of file
    descriptors) never ends the monitor, nor the server that runs it: it is logged, published
    as a ``subscriber_error`` event (``subscriber: "resource_monitor"``), counted in
    :attr:`failures`, and tried again after a back-off that doubles with each consecutive
    failure (from ``interval_seconds`` up to :data:`MAX_BACKOFF_SECONDS`).

    :param bus: where samples are published.
    :param interval_seconds: seconds between samples.
    :param job_id: the job id samples are published under.
    :param nvml: an NVML module to use instead of importing ``pynvml`` (for tests).
    :param workers: ``job_id -> pid`` of the running worker processes, sampled each time
        (None: the server's figures only).
    :param ranks: ``job_id -> rank -> pid`` of each distributed job's ranks, sampled each
        time as well (a distributed job's worker is the agent that started them).
    """

    def __init__(
        self,
        *,
        bus: EventBus,
        interval_seconds: float = 5.0,
        job_id: str = SERVER_JOB_ID,
        nvml: ModuleType | None = None,
        workers: WorkerPids | None = None,
        ranks: RankPids | None = None,
    ) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be positive, got {interval_seconds}")
        self.bus = bus
        self.interval_seconds = interval_seconds
        self.job_id = job_id
        self._nvml_module = nvml
        self._nvml: ModuleType | None = None
        self._nvml_tried = False
        self._workers = workers
        self._ranks = ranks
        self._worker_cpu: dict[tuple[int, float], tuple[float, float]] = {}
        """(pid, start time) -> (CPU seconds, wall clock) at a worker's last sample."""
        self.failures = 0
        """Samples that failed since the monitor was made."""
        self._process = psutil.Process(os.getpid())
        self._process.cpu_percent(None)  # the first call only starts the measurement
        psutil.cpu_percent(None)

    # -- sampling (blocking: call on a worker thread) ---------------------------------------

    def _load_nvml(self) -> ModuleType | None:
        if self._nvml_tried:
            return self._nvml
        self._nvml_tried = True
        try:
            nvml = self._nvml_module or importlib.import_module("pynvml")
            nvml.nvmlInit()
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as error:
            logger.info("no GPU metrics: NVML is not available (%s); CPU and memory only", error)
            return None
        if count == 0:
            logger.info("no GPU metrics: NVML found no GPU; CPU and memory only")
            nvml.nvmlShutdown()
            return None
        self._nvml = nvml
        return nvml

    def sample(self) -> dict[str, Any]:
        """Take one sample now (blocking)."""
        with self._process.oneshot():
            process_cpu = self._process.cpu_percent(None)
            rss = self._process.memory_info().rss
        pids = dict(self._workers()) if self._workers is not None else {}
        gpus, by_pid = self._gpus(set(pids.values()))
        data: dict[str, Any] = {
            "process_cpu_percent": float(process_cpu),
            "system_cpu_percent": float(psutil.cpu_percent(None)),
            "rss_bytes": int(rss),
            "gpus": gpus,
        }
        if self._workers is not None:
            nvml_present = self._nvml is not None
            data["workers"] = self._sample_workers(pids, by_pid if nvml_present else None)
        return data

    def _sample_workers(
        self, pids: Mapping[str, int], gpu_memory: Mapping[int, list[dict[str, Any]]] | None
    ) -> list[dict[str, Any]]:
        samples = []
        seen: set[tuple[int, float]] = set()
        ranks_of = dict(self._ranks()) if self._ranks is not None else {}
        for job_id, pid in sorted(pids.items()):
            try:
                sample = self._sample_process(psutil.Process(pid), gpu_memory, seen)
            except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                continue  # it ended (or was never ours) since the listing
            ranks = ranks_of.get(job_id)
            if ranks:  # a distributed job's agent: each rank on its own too
                sample["ranks"] = []
                for rank, rank_pid in sorted(ranks.items()):
                    try:
                        process = psutil.Process(rank_pid)
                        figures = self._sample_process(process, gpu_memory, seen)
                    except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
                        continue
                    sample["ranks"].append({"rank": rank, **figures})
            samples.append({"job_id": job_id, **sample})
        for key in set(self._worker_cpu) - seen:
            del self._worker_cpu[key]  # that process has ended
        return samples

    def _sample_process(
        self,
        process: psutil.Process,
        gpu_memory: Mapping[int, list[dict[str, Any]]] | None,
        seen: set[tuple[int, float]],
    ) -> dict[str, Any]:
        with process.oneshot():
            times = process.cpu_times()
            rss = process.memory_info().rss
            started = process.create_time()
        cpu_seconds = float(times.user + times.system)
        now = time.time()
        key = (process.pid, started)
        seen.add(key)
        before_cpu, before_at = self._worker_cpu.get(key, (0.0, started))
        self._worker_cpu[key] = (cpu_seconds, now)
        elapsed = now - before_at
        cpu_percent = 100.0 * (cpu_seconds - before_cpu) / elapsed if elapsed > 0 else None
        on_gpus = None if gpu_memory is None else gpu_memory.get(process.pid, [])
        return {
            "pid": process.pid,
            "cpu_seconds": cpu_seconds,
            "cpu_percent": cpu_percent,
            "rss_bytes": int(rss),
            "gpu_memory_bytes": _total_gpu_memory(on_gpus),
            "gpus": on_gpus or [],
        }

    def _gpus(
        self, pids: set[int] | None = None
    ) -> tuple[list[dict[str, Any]], dict[int, list[dict[str, Any]]]]:
        """Each GPU's figures, and the memory each of ``pids`` holds on each GPU."""
        by_pid: dict[int, list[dict[str, Any]]] = {}
        nvml = self._load_nvml()
        if nvml is None:
            return [], by_pid
        allocator = _torch_allocator()
        gpus = []
        for index in range(int(nvml.nvmlDeviceGetCount())):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            if pids:
                for running in _try(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or ():
                    pid = getattr(running, "pid", None)
                    if pid is not None:  # a worker's or one of its ranks
                        used = getattr(running, "usedGpuMemory", None)
                        by_pid.setdefault(pid, []).append(
                            {
                                "index": index,
                                "memory_used_bytes": None if used is None else int(used),
                            }
                        )
            memory = _try(nvml.nvmlDeviceGetMemoryInfo, handle)
            utilization = _try(nvml.nvmlDeviceGetUtilizationRates, handle)
            power_mw = _try(nvml.nvmlDeviceGetPowerUsage, handle)
            temperature = _try(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            gpu: dict[str, Any] = {
                "index": index,
                "name": _text(_try(nvml.nvmlDeviceGetName, handle)),
                "uuid": _text(_try(nvml.nvmlDeviceGetUUID, handle)),
                "utilization_ratio": None if utilization is None else utilization.gpu / 100.0,
                "memory_used_bytes": None if memory is None else int(memory.used),
                "memory_total_bytes": None if memory is None else int(memory.total),
                "temperature_celsius": None if temperature is None else float(temperature),
                "power_watts": None if power_mw is None else power_mw / 1000.0,
                "torch_allocated_bytes": None,
                "torch_reserved_bytes": None,
            }
            if allocator is not None and index < len(allocator):
                gpu["torch_allocated_bytes"], gpu["torch_reserved_bytes"] = allocator[index]
            gpus.append(gpu)
        return gpus, by_pid

    def close(self) -> None:
        """Release NVML (a later sample initialises it again)."""
        if self._nvml is not None:
            _try(self._nvml.nvmlShutdown)
        self._nvml = None
        self._nvml_tried = False

    # -- the task ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Sample and publish every ``interval_seconds`` until cancelled or the bus closes."""
        consecutive = 0
        try:
            while True:
                try:
                    await self.publish_sample()
                except BusClosed:
                    return
                except Exception as error:
                    consecutive += 1
                    self._report(error, consecutive)
                    delay = min(self.interval_seconds * 2**consecutive, MAX_BACKOFF_SECONDS)
                else:
                    consecutive = 0
                    delay = self.interval_seconds
                await anyio.sleep(delay)
        finally:
            self.close()

    def _report(self, error: Exception, consecutive: int) -> None:
        self.failures += 1
        logger.warning(
            "resource sample failed (%d in a row; retrying with back-off): %r", consecutive, error
        )
        data = {
            "subscriber": "resource_monitor",
            "event_type": None,
            "event_seq": None,
            "error_type": type(error).__name__,
            "message": str(error),
        }
        try:
            self.bus.publish(self.job_id, EventType.SUBSCRIBER_ERROR, data)
        except Exception as publishing:  # a full or closing bus: the log line stays
            logger.warning("resource sample failure not published: %r", publishing)

    async def publish_sample(self) -> None:
        """Take one sample off the event loop and publish it."""
        data = await anyio.to_thread.run_sync(self.sample)
        await self.bus.publish_async(self.job_id, EventType.RESOURCE_SAMPLE, data)


def _try(call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except Exception:  # NVML raises NVMLError_NotSupported and friends per figure
        return None


def _total_gpu_memory(on_gpus: list[dict[str, Any]] | None) -> int | None:
    """A worker's memory on all GPUs (None: unknown; NVML absent, or it cannot say)."""
    if on_gpus is None:
        return None
    used = [gpu["memory_used_bytes"] for gpu in on_gpus]
    return None if None in used else sum(used)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    return None if value is None else str(value)


def _torch_allocator() -> list[tuple[int, int]] | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return None
    if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return None
    return [
        (int(torch.cuda.memory_allocated(i)), int(torch.cuda.memory_reserved(i)))
        for i in range(torch.cuda.device_count())
    ]
