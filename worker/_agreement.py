"""How the ranks of a distributed job stay in step: the trainer of each rank trains on its
shard of the trainer's own epoch order, averages gradients over the ranks, all-reduces its
epoch figures, and takes commands only as rank 0 broadcasts them, so that every rank applies
a command at the same step.

The agreement on commands is the SDK's (``sdk/_agreement.py``, shared with runs of users' own
code under ``torchrun``): at each batch boundary rank 0 broadcasts whether a command is
pending (one integer), except that here the step's gradient all-reduce carries that answer
as one extra element; when one is, it broadcasts the commands themselves. A paused job holds
every rank: rank 0 waits for commands at most :data:`PAUSE_POLL_SECONDS` at a time, so no
collective waits longer than that while paused. Each rank also records what it applied.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed as dist
from torch.autograd import Variable

from trainbus.bus import Command, ControlChannel
from trainbus.sdk._agreement import PAUSE_POLL_SECONDS, RanksLost, collective_device
from trainbus.sdk._agreement import AgreedControl as _SharedAgreement
from trainbus.sdk._agreement import collective as _collective

from ._rank_progress import ProgressReporter, rank_pids
from ._trainer import Outcome, RunResult, Trainer

__all__ = [
    "PAUSE_POLL_SECONDS",
    "AgreedControl",
    "DistributedTrainer",
    "RanksLost",
    "clear_lost_peers",
    "lost_peer_path",
    "rank_record_path",
]

logger = logging.getLogger(__name__)

GRADIENT_BUCKET_BYTES = 25 * 1024 * 1024
"""The most gradient bytes averaged in one all-reduce (DDP's default bucket size)."""

PEER_GRACE_SECONDS = 10.0
"""How long a rank whose collective failed waits for the agent to end it: the agent names the
rank that failed first, which must not be this one."""


def rank_record_path(job_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` records, as JSON lines, its process (``{"rank", "pid"}``), each
    command it applied with its step (``{"applied": kind, "command_id", "step"}``) and its
    own part of each epoch's figures (``{"epoch", "loss_sum", "samples"}``): what an operator
    checks the ranks kept in step with."""
    return job_dir / "ranks" / f"rank-{rank}.jsonl"


def lost_peer_path(job_dir: Path, rank: int) -> Path:
    """Where rank ``rank`` says that a rank of another host is gone (its agent cannot see
    ranks of other hosts, so the rank tells it why it ended)."""
    return job_dir / "ranks" / f"lost-{rank}.txt"


def clear_lost_peers(job_dir: Path) -> None:
    """Forget what the ranks of the job's previous run said (a new run starts)."""
    for rank_said in lost_peer_path(job_dir, 0).parent.glob("lost-*.txt"):
        rank_said.unlink(missing_ok=True)


def _append(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as record:
        record.write(json.dumps(entry) + "\n")


class AgreedControl(_SharedAgreement):
    """The control channel as a rank's trainer sees it: rank 0's commands, agreed by every
    rank at the same batch boundary, each applied one recorded in the rank's record.
    Anything else (sending commands, as an inline callback of rank 0 may) goes to the rank's
    own channel."""

    def __init__(self, channel: ControlChannel, *, rank: int, job_dir: Path) -> None:
        super().__init__(channel, rank=rank)
        self._own = channel
        self.record = rank_record_path(job_dir, rank)
        self.record.parent.mkdir(parents=True, exist_ok=True)
        _append(self.record, {"rank": rank, "pid": os.getpid()})

    @property
    def channel(self) -> ControlChannel:
        """The rank's own channel (rank 0's is the job's)."""
        return self._own

    def __getattr__(self, name: str) -> Any:
        return getattr(self._own, name)

    def applied(self, command: Command, *, step: int, **data: Any) -> Any:
        _append(
            self.record, {"applied": command.kind.value, "command_id": command.id, "step": step}
        )
        return super().applied(command, step=step, **data)


class DistributedTrainer(Trainer):
    """The trainer of one rank of a distributed job (the process group is initialised)."""

    def __init__(self, *, control: ControlChannel, job_dir: Path, **kwargs: Any) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        agreed = AgreedControl(control, rank=self.rank, job_dir=job_dir)
        self.agreed = agreed
        self.job_dir = job_dir
        super().__init__(control=agreed, **kwargs)  # type: ignore[arg-type]
        # before the barrier: once every rank is built, each one's pid and step are on disk
        self.progress = ProgressReporter(job_dir, self.rank, lambda: self.step).start()
        self.end_requested = threading.Event()
        """Set when the agent asks a rank other than 0 to end (SIGTERM)."""
        self._averaging_queued = False
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                parameter.register_post_accumulate_grad_hook(  # type: ignore[no-untyped-call]
                    self._gradient_accumulated
                )
        with _collective():  # every rank built: rank 0 may restore (and remove) the kept state
            dist.barrier()

    def _train_samples(self) -> int:
        return -(-len(self.data.y_train) // dist.get_world_size())  # every rank: the same

    def _epoch_order(self) -> torch.Tensor:
        """The rank's shard of the epoch's order: every ``world_size``-th index from its
        rank on, the order padded from its start to a multiple of the ranks (as
        ``DistributedSampler`` splits it)."""
        order = super()._epoch_order()
        shard = self._train_samples()
        padding = shard * self.world_size - len(order)
        if padding:
            order = torch.cat([order, order[:padding]])
        return order[self.rank :: self.world_size]

    def _gradient_accumulated(self, parameter: torch.Tensor) -> None:
        # once a backward: average every gradient when backward has ended, in as few
        # all-reduces as the buckets allow (one a parameter, each waiting for the other ranks,
        # made two CPU ranks train at half the speed of DDP's, bench/distributed.py)
        if not self._averaging_queued:
            self._averaging_queued = True
            Variable._execution_engine.queue_callback(self._average_gradients)

    def _average_gradients(self) -> None:
        self._averaging_queued = False
        buckets: list[list[torch.Tensor]] = [[]]
        size = 0
        for parameter in self.model.parameters():
            if parameter.grad is None:
                continue
            if size >= GRADIENT_BUCKET_BYTES:
                buckets.append([])
                size = 0
            buckets[-1].append(parameter.grad)
            size += parameter.grad.numel() * parameter.grad.element_size()
        for bucket in buckets[:-1]:
            self._average_bucket(bucket)
        if buckets[-1]:
            # the last all-reduce of the step also carries whether rank 0 has commands: the
            # next batch boundary then needs no broadcast of its own (two collectives a step
            # where DDP has one cost two ranks on the CPU about 8%, bench/distributed.py)
            self._average_bucket(buckets[-1], carry_flag=True)

    def _average_bucket(self, gradients: list[torch.Tensor], *, carry_flag: bool = False) -> None:
        parts = [gradient.reshape(-1) for gradient in gradients]
        if carry_flag:
            flag = self.agreed.local_flag()
            parts.append(torch.full((1,), flag, dtype=parts[0].dtype, device=parts[0].device))
        flat = torch.cat(parts)
        with _collective():
            dist.all_reduce(flat)
        if carry_flag:
            self.agreed.carry(float(flat[-1]))
        flat.div_(self.world_size)
        offset = 0
        for gradient in gradients:
            gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
            offset += gradient.numel()

    def _reduce_epoch(self, totals: tuple[float, int, int]) -> tuple[float, int, int]:
        _append(
            self.agreed.record, {"epoch": self.epoch, "loss_sum": totals[0], "samples": totals[1]}
        )
        summed = torch.tensor(totals, dtype=torch.float64, device=collective_device())
        with _collective():
            dist.all_reduce(summed)
        loss_sum, seen, trained = summed.tolist()
        return loss_sum, int(seen), int(trained)

    def share_weights(self) -> None:
        """Give every rank rank 0's parameters and buffers (after a restore, before training)."""
        with _collective(), torch.no_grad():
            for tensor in self.model.state_dict().values():
                dist.broadcast(tensor, src=0)

    @property
    def _several_hosts(self) -> bool:
        return int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size)) < self.world_size

    def share_state(self) -> None:
        """Give every rank rank 0's whole state (weights, optimizer, position, random
        streams): the ranks of a job's other hosts have none of its files to resume from."""
        shared: list[Any] = [self.state_dict() if self.rank == 0 else None]
        with _collective():
            dist.broadcast_object_list(shared, src=0)
        if self.rank != 0:
            self.load_state_dict(shared[0])

    def run(self) -> RunResult:
        try:
            return self._train()
        finally:
            self.progress.stop()

    def _train(self) -> RunResult:
        try:
            if self._several_hosts:
                self.share_state()
            self.share_weights()
        except RanksLost as error:
            return self._lost(error)
        result = super().run()
        failure = result.error or {}
        if result.outcome is Outcome.FAILED and failure.get("type") == RanksLost.__name__:
            return self._lost(RanksLost(str(failure.get("message"))))
        return result

    def _other_host_lost(self) -> bool:
        """Of a job on several hosts: whether every rank of this host still runs, so that
        the rank gone is another host's, which this host's agent will never name."""
        if not self._several_hosts:
            return False
        for rank, pid in rank_pids(self.job_dir).items():
            try:
                if rank != self.rank and psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    return False
            except psutil.Error:
                return False
        return True

    def _lost(self, error: RanksLost) -> RunResult:
        """Another rank is gone: wait for the agent to end this one (it names the rank that
        failed first); if it does not, end without reporting a result of this rank's own. A
        collective that timed out ends this rank at once (the rank that hangs fails nothing)."""
        logger.error("rank %d: %s", self.rank, error)
        if "timed out" in str(error).lower():  # another rank hangs: none fails before this one
            os._exit(1)
        if self._other_host_lost():
            lost_peer_path(self.job_dir, self.rank).write_text(
                f"a rank of another host is gone ({error})"
            )
            os._exit(1)
        deadline = time.monotonic() + PEER_GRACE_SECONDS
        channel = self.agreed.channel
        while time.monotonic() < deadline and not (channel.closed or self.end_requested.is_set()):
            time.sleep(0.05)
        os._exit(1)
