"""``trainbus agent``: the ranks of one of the other hosts of a job on several hosts.

It reads the job with the user's token, waits for a run of it, runs this host's ranks under
torch's elastic agent at the run's rendezvous (``trainbus.worker.run_node_agent``) and, unless
told to join one run only, waits for the job's next run (a resume) and joins that too, until
the job completes or is deleted, or no run starts within the wait.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from .client import HTTPStatusError, TrainbusClient

__all__ = ["AgentRefused", "follow_job"]

_POLL_SECONDS = 0.2
_LOOPBACK = ("localhost", "127.0.0.1", "::1", "ip6-localhost")


class AgentRefused(Exception):
    """The job is not one this host can run ranks of (a one-host job, a node rank it lacks)."""


def follow_job(
    client: TrainbusClient,
    job_id: str,
    *,
    node_rank: int,
    wait: float,
    once: bool,
    data_dir: Path,
    console: Console,
) -> int:
    """Join the job's runs as host ``node_rank``; the exit status (0: the job completed, or
    its one run ended with ``once``)."""
    code = 0
    joined = None
    while True:
        record = _next_run(client, job_id, node_rank, wait, joined, console)
        if record is None:
            return code
        if isinstance(record, int):
            return record
        joined = record["rendezvous"]["run"]
        code = _join(record, node_rank, data_dir, console)
        if once:
            return code


def _next_run(
    client: TrainbusClient,
    job_id: str,
    node_rank: int,
    wait: float,
    joined: str | None,
    console: Console,
) -> dict[str, Any] | int | None:
    """The job's record once a run of it other than ``joined`` waits for its hosts; None
    when the job completed or was deleted; an exit status when none started in ``wait``."""
    deadline = time.monotonic() + wait
    said = None
    while True:
        record = _record(client, job_id)
        if record is None or record["state"] == "completed":
            state = "deleted" if record is None else "completed"
            console.print(f"job {job_id} is {state}: host {node_rank} is done")
            return None
        _check_host(record, node_rank)
        rendezvous = record.get("rendezvous")
        if rendezvous and rendezvous["run"] != joined:
            return record
        if time.monotonic() >= deadline:
            why = f": {record['waiting_for']}" if record.get("waiting_for") else ""
            console.print(
                f"trainbus: no run of job {job_id} started within {wait:g} s "
                f"(it is {record['state']}{why})"
            )
            return 1
        if said != record["state"]:
            said = record["state"]
            console.print(f"job {job_id} is {said}: waiting up to {wait:g} s for a run to join")
        time.sleep(_POLL_SECONDS)  # polling the job's record, bounded by the deadline


def _check_host(record: dict[str, Any], node_rank: int) -> None:
    nnodes = int((record["spec"].get("distributed") or {}).get("nnodes", 1))
    if nnodes < 2:
        raise AgentRefused(
            f"job {record['id']} runs on the server's host alone (distributed.nnodes is "
            f"{nnodes}): it has no other host to run"
        )
    if not 1 <= node_rank < nnodes:
        raise AgentRefused(
            f"job {record['id']} has {nnodes} hosts: --node-rank must be 1 to {nnodes - 1} "
            f"(the server's host is 0), got {node_rank}"
        )


def _join(record: dict[str, Any], node_rank: int, data_dir: Path, console: Console) -> int:
    # torch's C++ warnings, before torch loads: the store's end at each run's end is one
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from trainbus.worker import run_node_agent  # torch: only this command needs it

    job_id, spec = record["id"], record["spec"]
    distributed = spec["distributed"]
    console.print(
        f"joining job {job_id} at {record['rendezvous']['endpoint']} as host {node_rank} of "
        f"{distributed['nnodes']} ({distributed['nproc_per_node']} ranks here)"
    )
    endpoint = record["rendezvous"]["endpoint"]
    if endpoint.rpartition(":")[0] in _LOOPBACK:
        console.print(
            f"note: the job's rendezvous {endpoint} is a loopback address, which only an agent "
            "on the server's own host reaches: for other hosts, set the server's "
            "distributed_rendezvous to an address they reach"
        )
    code, failure = run_node_agent(job_id, spec, endpoint, node_rank, data_dir)
    if code == 0:
        console.print(f"host {node_rank}'s ranks of job {job_id} ended")
    else:
        why = failure or f"the agent exited with code {code}"
        console.print(f"trainbus: host {node_rank}'s ranks of job {job_id}: {why}")
    return code


def _record(client: TrainbusClient, job_id: str) -> dict[str, Any] | None:
    """The job's record (None: deleted); a server that restarts is waited for."""
    while True:
        try:
            return client.job(job_id)
        except HTTPStatusError as error:
            if error.status == 404:
                return None
            raise
        except httpx.TransportError:  # the server restarts: its jobs resume after
            time.sleep(1.0)
