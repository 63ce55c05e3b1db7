"""Each job's own random numbers, although PyTorch's default generators are process-wide.

Dropout and weight initialisation draw from the default generator of their device, which
every thread shares: two jobs training at once would take each other's numbers, and neither
would be reproducible from its seed or resume exactly. So each job keeps its own generator
state, and whatever of the job may draw random numbers (building the model, each forward
pass) runs inside its :class:`JobRandom`: under one process-wide lock, the default generators
are given the job's state, which is read back when the body ends.

Outside a job's draws the default generators hold whatever the last job left there; code
that draws from them outside a job neither disturbs a job nor is reproducible by one. Putting
the previous state back as well would double the copies on the hot path. The cost is one
5 KB state copy each way per forward pass (the CPU's Mersenne Twister) and the lock, which
serialises the forward passes of concurrent jobs (not their backward passes or optimizer
steps).
"""

from __future__ import annotations

import threading
from typing import Any

import torch

__all__ = ["JobRandom", "ProcessRandom", "RandomStreams"]

_DEFAULT_GENERATORS = threading.Lock()
"""Held while a job's state is in the process-wide default generators."""
_CPU = torch.default_generator


class JobRandom:
    """One job's random-number streams (CPU, and its CUDA device when it trains on one).

    Use it as a context manager (``with job_random:``) around whatever may draw numbers: the
    body runs with the job's streams in the default generators (not reentrant).
    """

    __slots__ = ("_cpu", "_cuda", "_cuda_device")

    def __init__(self, seed: int, device: torch.device) -> None:
        self._cpu = torch.Generator().manual_seed(seed).get_state()
        self._cuda_device: int | None = None
        self._cuda: torch.Tensor | None = None
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            self._cuda_device = index
            self._cuda = torch.Generator(f"cuda:{index}").manual_seed(seed).get_state()

    # A class, not @contextmanager: this runs around every forward pass, and the generator
    # version costs a few microseconds more per step.
    def __enter__(self) -> None:
        _DEFAULT_GENERATORS.acquire()
        try:
            _CPU.set_state(self._cpu)
            if self._cuda_device is not None:
                assert self._cuda is not None
                torch.cuda.set_rng_state(self._cuda, self._cuda_device)
        except BaseException:
            _DEFAULT_GENERATORS.release()
            raise

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._cpu = _CPU.get_state()
            if self._cuda_device is not None:
                self._cuda = torch.cuda.get_rng_state(self._cuda_device)
        finally:
            _DEFAULT_GENERATORS.release()

    def state_dict(self) -> dict[str, Any]:
        """The streams' states, as tensors (loadable with ``weights_only=True``)."""
        state: dict[str, Any] = {"torch": self._cpu.clone()}
        if self._cuda is not None:
            state["cuda"] = self._cuda.clone()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (a CUDA state applies only to a CUDA job)."""
        self._cpu = state["torch"].clone()
        cuda = state.get("cuda")
        if self._cuda is not None and isinstance(cuda, torch.Tensor):
            self._cuda = cuda.clone()


class ProcessRandom:
    """The random streams of a job that has its process to itself (a worker process, or a
    program with one trainer): the default generators are the job's, seeded once, so that
    nothing is swapped around each forward pass (:class:`JobRandom` costs a tiny job's step
    about 2%). Same interface as :class:`JobRandom`; entering it does nothing."""

    __slots__ = ("_cuda_device",)

    def __init__(self, seed: int, device: torch.device) -> None:
        _CPU.manual_seed(seed)
        self._cuda_device: int | None = None
        if device.type == "cuda":
            index = torch.cuda.current_device() if device.index is None else device.index
            self._cuda_device = index
            torch.cuda.manual_seed(seed)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc_info: object) -> None:
        return None

    def state_dict(self) -> dict[str, Any]:
        """The streams' states, as tensors (loadable with ``weights_only=True``)."""
        state: dict[str, Any] = {"torch": _CPU.get_state()}
        if self._cuda_device is not None:
            state["cuda"] = torch.cuda.get_rng_state(self._cuda_device)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (a CUDA state applies only to a CUDA job)."""
        _CPU.set_state(state["torch"].clone())
        cuda = state.get("cuda")
        if self._cuda_device is not None and isinstance(cuda, torch.Tensor):
            torch.cuda.set_rng_state(cuda.clone(), self._cuda_device)


RandomStreams = JobRandom | ProcessRandom
"""A job's random streams: its own (it shares the process) or the process's (it does not)."""
