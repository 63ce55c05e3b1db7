"""Device slots: the CPU shares and CUDA devices a server lends its jobs, and which job holds
which.

A job asks for ``devices`` (default 1) of the kind its spec's ``device`` names: ``cpu``,
``cuda``, ``cuda:K`` (that one CUDA device), or ``auto`` (CUDA when the server has CUDA slots,
else CPU). The scheduler starts it once that many slots of its kind are free; its worker
process sees only the CUDA devices it holds (``CUDA_VISIBLE_DEVICES``, empty for a CPU job)
and trains with its share of the cores as torch threads unless its spec sets
``torch_threads``.

A CPU slot is an equal share of the cores the server may use; a CUDA slot is one device.
Simulated CUDA slots exist for scheduling only: their jobs get ``CUDA_VISIBLE_DEVICES`` as on
a GPU machine but train on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ._errors import SpecError

__all__ = [
    "DeviceKind",
    "DevicePool",
    "DeviceRequest",
    "DeviceSlot",
    "device_slots",
    "usable_cores",
]

DeviceKind = Literal["cpu", "cuda"]


@dataclass(frozen=True, slots=True)
class DeviceSlot:
    """One slot a job can hold."""

    kind: DeviceKind
    index: int
    visible_id: str = ""
    """The device's entry in ``CUDA_VISIBLE_DEVICES`` (its index, or the entry the server
    itself was started with); empty for a CPU slot."""
    simulated: bool = False
    """A CUDA slot that exists for scheduling only (its job trains on the CPU)."""

    @property
    def name(self) -> str:
        return f"{self.kind}:{self.index}"


@dataclass(frozen=True, slots=True)
class DeviceRequest:
    """What a job asks for: ``count`` slots of ``kind``, or the one CUDA device ``index``."""

    kind: DeviceKind
    count: int = 1
    index: int | None = None

    def describe(self) -> str:
        if self.index is not None:
            return f"{self.kind}:{self.index}"
        noun = "device" if self.kind == "cuda" else "slot"
        return f"{self.count} {self.kind} {noun}{'' if self.count == 1 else 's'}"


def usable_cores() -> int:
    """The cores to share out: torch's own intra-op thread count (``OMP_NUM_THREADS`` where
    set, else the physical cores), within the CPUs this process may run on."""
    import torch

    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), allowed))


def device_slots(
    entries: Sequence[str],
    *,
    default_cpu_slots: int,
    simulated_cuda: int = 0,
    cuda_count: int | None = None,
    visible: str | None = None,
) -> tuple[DeviceSlot, ...]:
    """The slots the ``devices`` setting names.

    :param entries: ``["auto"]``, or entries ``cpu:N`` (N CPU slots) and ``cuda:K`` (CUDA
        device K), as the settings validated them.
    :param default_cpu_slots: CPU slots of ``auto`` (the server's running-job limit).
    :param simulated_cuda: CUDA slots for scheduling only, in place of any real ones.
    :param cuda_count: CUDA devices on this machine (None: asked of torch, which asks NVML
        where present without initialising CUDA).
    :param visible: the server's own ``CUDA_VISIBLE_DEVICES`` (None: read from the process):
        a worker's entries are taken from it, so that they name the same devices.
    :raises ValueError: for a CUDA device this machine does not have, or simulated devices
        next to listed CUDA devices.
    """
    listed_cuda = [entry for entry in entries if entry.startswith("cuda:")]
    if simulated_cuda and listed_cuda:
        raise ValueError(
            f"devices lists {', '.join(listed_cuda)} and simulated_cuda_devices is "
            f"{simulated_cuda}: simulated devices stand in for real ones; set one or the other"
        )
    slots: list[DeviceSlot] = []
    cuda: list[int]
    if simulated_cuda:
        cuda = list(range(simulated_cuda))
    else:
        count = _cuda_count() if cuda_count is None else cuda_count
        if entries == ["auto"]:
            cuda = list(range(count))
        else:
            cuda = [int(entry.removeprefix("cuda:")) for entry in listed_cuda]
            missing = [index for index in cuda if index >= count]
            if missing:
                have = ", ".join(f"cuda:{i}" for i in range(count)) or "none"
                raise ValueError(
                    f"devices lists cuda:{missing[0]}, but this machine has {count} CUDA "
                    f"device(s) ({have}): list only those, or set devices to auto"
                )
    ids = _visible_ids(os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible)
    for index in cuda:
        visible_id = ids[index] if not simulated_cuda and index < len(ids) else str(index)
        slots.append(DeviceSlot("cuda", index, visible_id, simulated=bool(simulated_cuda)))
    if entries == ["auto"]:
        cpu = default_cpu_slots
    else:
        cpu = sum(int(entry.removeprefix("cpu:")) for entry in entries if entry.startswith("cpu:"))
    slots.extend(DeviceSlot("cpu", index) for index in range(cpu))
    return tuple(slots)


def _cuda_count() -> int:
    import torch

    return int(torch.cuda.device_count())


def _visible_ids(value: str | None) -> list[str]:
    if not value:
        return []
    return [entry.strip() for entry in value.split(",") if entry.strip()]


@dataclass(frozen=True, slots=True)
class _Holding:
    job_id: str
    slots: tuple[DeviceSlot, ...]


class DevicePool:
    """The server's device slots and who holds them (used on the event loop only).

    :param slots: every slot (:func:`device_slots`).
    :param cores: cores shared out as torch threads (default: :func:`usable_cores`).
    """

    def __init__(self, slots: Sequence[DeviceSlot], *, cores: int | None = None) -> None:
        self.slots = tuple(slots)
        self.cores = usable_cores() if cores is None else cores
        self._holdings: dict[Hashable, _Holding] = {}

    def of_kind(self, kind: DeviceKind) -> tuple[DeviceSlot, ...]:
        return tuple(slot for slot in self.slots if slot.kind == kind)

    def describe(self) -> str:
        """The slots as the settings would list them: ``cuda:0, cuda:1, cpu:2``."""
        cuda = [slot.name for slot in self.of_kind("cuda")]
        cpu = len(self.of_kind("cpu"))
        return ", ".join([*cuda, *([f"cpu:{cpu}"] if cpu else [])]) or "none"

    # -- requests ---------------------------------------------------------------------------

    def request_of(self, spec: Mapping[str, Any]) -> DeviceRequest:
        """What a job spec (validated, as stored) asks for."""
        device = str(spec.get("device") or "auto")
        count = int(spec.get("devices") or 1)
        distributed = spec.get("distributed")
        if isinstance(distributed, Mapping):  # one slot for each rank
            count = max(count, int(distributed.get("nproc_per_node") or 1))
        if device == "auto":
            return DeviceRequest("cuda" if self.of_kind("cuda") else "cpu", count)
        if device.startswith("cuda:"):
            return DeviceRequest("cuda", count, int(device.removeprefix("cuda:")))
        return DeviceRequest("cuda" if device == "cuda" else "cpu", count)

    def check(self, request: DeviceRequest) -> None:
        """:raises SpecError: if this server could never give ``request``."""
        have = self.of_kind(request.kind)
        if request.index is not None:
            if request.count != 1:
                raise SpecError(
                    f"device 'cuda:{request.index}' names one device, but devices is "
                    f"{request.count}: ask for device 'cuda' with devices {request.count}, or "
                    "for devices 1"
                )
            if not any(slot.index == request.index for slot in have):
                raise SpecError(
                    f"the job asks for cuda:{request.index}, but this server lends "
                    f"{self.describe()} (setting devices): ask for device 'cuda' or one it has"
                )
            return
        if request.count > len(have):
            raise SpecError(
                f"the job asks for {request.describe()}, but this server has "
                f"{len(have)} in all ({self.describe()}; setting devices): ask for at most "
                f"{len(have)}" + ("" if have else f", or for device '{_other(request.kind)}'")
            )

    # -- holding ----------------------------------------------------------------------------

    def free(self, kind: DeviceKind) -> tuple[DeviceSlot, ...]:
        held = {slot for holding in self._holdings.values() for slot in holding.slots}
        return tuple(slot for slot in self.of_kind(kind) if slot not in held)

    def available(self, request: DeviceRequest) -> tuple[DeviceSlot, ...] | None:
        """The slots ``request`` would get now (None: not enough are free)."""
        free = self.free(request.kind)
        if request.index is not None:
            free = tuple(slot for slot in free if slot.index == request.index)
        return free[: request.count] if len(free) >= request.count else None

    def hold(self, key: Hashable, job_id: str, slots: Sequence[DeviceSlot]) -> None:
        """Lend ``slots`` to ``job_id``'s run ``key`` until :meth:`release`."""
        self._holdings[key] = _Holding(job_id, tuple(slots))

    def release(self, key: Hashable) -> None:
        self._holdings.pop(key, None)

    def held(self, key: Hashable) -> tuple[DeviceSlot, ...]:
        holding = self._holdings.get(key)
        return () if holding is None else holding.slots

    def held_by_job(self, job_id: str) -> tuple[DeviceSlot, ...]:
        for holding in self._holdings.values():
            if holding.job_id == job_id:
                return holding.slots
        return ()

    def shortage(self, request: DeviceRequest) -> str | None:
        """Why ``request`` cannot start now (None: its slots are free)."""
        if self.available(request) is not None:
            return None
        have = self.of_kind(request.kind)
        holders = {
            slot: holding.job_id for holding in self._holdings.values() for slot in holding.slots
        }
        taken = ", ".join(
            f"{slot.name} held by {holders[slot]}" for slot in have if slot in holders
        )
        free = len(have) - sum(slot in holders for slot in have)
        return f"{request.describe()} ({free} free of {len(have)}; {taken})"

    # -- the worker's view ------------------------------------------------------------------

    def environment(self, slots: Sequence[DeviceSlot]) -> dict[str, str]:
        """The worker's ``CUDA_VISIBLE_DEVICES``: the CUDA devices it holds, none for a CPU
        job (it cannot take a GPU another job holds)."""
        return {"CUDA_VISIBLE_DEVICES": ",".join(s.visible_id for s in slots if s.kind == "cuda")}

    def threads(self, slots: Sequence[DeviceSlot]) -> int:
        """Torch threads for a run holding ``slots``: its CPU slots' share of the cores, or
        for a CUDA job the cores over the CUDA devices."""
        cpu = sum(slot.kind == "cpu" for slot in slots)
        if cpu:
            return max(1, self.cores * cpu // len(self.of_kind("cpu")))
        return max(1, self.cores // max(1, len(self.of_kind("cuda"))))

    def worker_spec(self, spec: Mapping[str, Any], slots: Sequence[DeviceSlot]) -> dict[str, Any]:
        """The spec as its worker process runs it: the device it sees (the first CUDA device
        visible to it, or the CPU for CPU and simulated slots) and, unless the spec sets
        them, its share of torch threads."""
        placed = dict(spec)
        cuda = [slot for slot in slots if slot.kind == "cuda"]
        if "device" in placed:  # a spec without these fields (a program's) runs as it is
            placed["device"] = "cuda" if cuda and not cuda[0].simulated else "cpu"
        if "torch_threads" in placed and placed["torch_threads"] is None:
            placed["torch_threads"] = self.threads(slots)
        return placed


def _other(kind: DeviceKind) -> DeviceKind:
    return "cpu" if kind == "cuda" else "cuda"
