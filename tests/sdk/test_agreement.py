"""Control agreed across ranks, with two real gloo processes: rank 0's commands reach every
rank at the same boundary, and so does the end of rank 0's channel (a server that let rank 0's
run go), so that no rank trains on into a collective the others have left."""

from __future__ import annotations

import multiprocessing
import socket
from datetime import timedelta
from typing import Any

import pytest

from trainbus.bus import CommandKind, ControlChannel

BOUNDARIES = 8


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _rank(rank: int, port: int, close_at: int, results: Any) -> None:
    import torch.distributed as dist

    from trainbus.sdk._agreement import AgreedControl

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=timedelta(seconds=20),
    )  # fmt: skip
    channel = ControlChannel("agreement") if rank == 0 else None
    control = AgreedControl(channel, rank=rank)
    seen: list[tuple[int, str]] = []
    try:
        for boundary in range(BOUNDARIES):
            if channel is not None and boundary == 2:
                channel.send(CommandKind.SAVE)
            if channel is not None and boundary == close_at:
                channel.close()  # as a run let go by its server: no command pending
            if control.pending:
                seen += [(boundary, command.kind.value) for command in control.take()]
            if control.closed:
                seen.append((boundary, "closed"))
                break
    finally:
        dist.destroy_process_group()
    results.put((rank, seen))


@pytest.mark.timeout(60)
def test_rank_0_commands_and_its_closed_channel_reach_every_rank_at_the_same_boundary() -> None:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=_rank, args=(rank, port, 5, results)) for rank in (0, 1)]
    for process in processes:
        process.start()
    seen = dict(results.get(timeout=50) for _ in processes)
    for process in processes:
        process.join(timeout=10)
        assert process.exitcode == 0
    assert seen[0] == seen[1] == [(2, "save"), (5, "closed")]
