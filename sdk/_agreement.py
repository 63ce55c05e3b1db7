"""Commands agreed across the ranks of a distributed process group, so that every rank
applies a command at the same step.

At each batch boundary rank 0 broadcasts whether a command is pending (one integer), unless a
collective since the last boundary carried that answer (:meth:`AgreedControl.carry`); when one
is, it broadcasts the commands themselves, and every rank applies them. A paused run holds
every rank: rank 0 waits for commands at most :data:`PAUSE_POLL_SECONDS` at a time and
broadcasts what it got (often nothing), so no collective waits longer than that while paused.

Built-in distributed jobs (the worker's trainer of each rank) and the SDK's runs under
``torchrun`` share it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from trainbus.bus import Command, ControlChannel

__all__ = [
    "PAUSE_POLL_SECONDS",
    "AgreedControl",
    "RanksLost",
    "collective",
    "collective_device",
    "process_rank",
    "waiting_since",
]

PAUSE_POLL_SECONDS = 1.0
"""How long rank 0 waits for a command while paused before the ranks exchange again."""


class RanksLost(RuntimeError):
    """Raised when a collective failed: another rank of the process group is gone."""


_waiting_since: float | None = None


def waiting_since() -> float | None:
    """When (``time.monotonic()``) this process entered the collective it waits in, or the
    one that failed; None while it is in none."""
    return _waiting_since


def collective_device() -> torch.device:
    """Where the tensors of this process's collectives live: its current CUDA device under
    nccl, which takes no CPU tensor; the CPU otherwise (gloo)."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextmanager
def collective() -> Iterator[None]:
    """Turn the error of a failed collective into :class:`RanksLost`, and keep when this
    process began to wait in it (:func:`waiting_since`: which rank stalled the others)."""
    global _waiting_since
    _waiting_since = time.monotonic()
    try:
        yield
    except RanksLost:
        raise
    except (RuntimeError, ValueError) as error:  # gloo and NCCL raise these for a lost peer
        raise RanksLost(f"a collective across the job's ranks failed: {error}") from error
    _waiting_since = None  # a failed one stays: the rank was left waiting for the others


def process_rank() -> int | None:
    """This process's rank when ``torch.distributed`` is initialised with more than one
    process; None otherwise (a single process, which exchanges nothing)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank()
    return None


class AgreedControl:
    """A control channel as every rank sees it: rank 0's commands, agreed by every rank at
    the same batch boundary. Rank 0 holds the run's channel; the other ranks hold none (they
    receive nothing of their own) and acknowledge nothing."""

    def __init__(self, channel: ControlChannel | None, *, rank: int) -> None:
        if rank == 0 and channel is None:
            raise ValueError("rank 0 needs the run's control channel")
        self._channel = channel
        self._rank = rank
        self._flag: torch.Tensor | None = None  # made at the first ask, on the group's device
        self._carried: bool | None = None
        self._closed = False

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def pending(self) -> bool:
        """Whether rank 0 has commands: a collective, so every rank asks at the same step
        (none when a collective since the last ask carried the answer, :meth:`carry`)."""
        carried = self._carried
        if carried is not None:
            self._carried = None
            return carried
        flag = self._flag
        if flag is None:
            flag = self._flag = torch.zeros(1, dtype=torch.int64, device=collective_device())
        flag[0] = int(self.local_flag())
        with collective():
            dist.broadcast(flag, src=0)
        return bool(flag[0])

    def local_flag(self) -> float:
        """What this rank adds to a collective that carries the pending flag: 1 on rank 0
        with commands pending or its channel closed (the server let its run go: every rank
        must learn it at the same step), else 0 (summed over the ranks, the flag is rank 0's)."""
        channel = self._channel
        if channel is None or self._rank != 0:
            return 0.0
        return float(channel.pending or channel.closed)

    def carry(self, summed: float) -> None:
        """The pending flag came summed in a collective every rank took part in (a training
        step's gradient all-reduce): the next :attr:`pending` answers with it, no broadcast."""
        self._carried = summed > 0

    @property
    def closed(self) -> bool:
        """Whether rank 0's channel was closed when the ranks last exchanged commands."""
        return self._closed

    def take(self) -> list[Command]:
        return self._exchange(self._leader().take() if self._rank == 0 else [])

    def wait(self, timeout: float | None = None) -> list[Command]:
        """Wait (rank 0) for commands at most :data:`PAUSE_POLL_SECONDS`; every rank gets
        what it got, possibly nothing."""
        waited = PAUSE_POLL_SECONDS if timeout is None else min(timeout, PAUSE_POLL_SECONDS)
        return self._exchange(self._leader().wait(waited) if self._rank == 0 else [])

    def applied(self, command: Command, *, step: int, **data: Any) -> Any:
        """Acknowledge ``command`` (rank 0 only: the run's channel publishes it)."""
        if self._rank == 0:
            return self._leader().applied(command, step=step, **data)
        return None

    def _leader(self) -> ControlChannel:
        assert self._channel is not None
        return self._channel

    def _exchange(self, commands: list[Command]) -> list[Command]:
        message: list[Any] = [(commands, self._leader().closed) if self._rank == 0 else None]
        with collective():
            dist.broadcast_object_list(message, src=0)
        agreed, self._closed = message[0]
        return list(agreed)
