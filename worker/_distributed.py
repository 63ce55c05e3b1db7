"""A distributed job's processes: its worker process is torch's elastic agent (the launch API
``torch.distributed.run`` uses), which forks the job's ranks on this host and tears them all
down when one fails; rank 0 is the job's worker (it connects to the server with the job's
credential and publishes the job's events), the other ranks publish nothing. A job on several
hosts has one agent on each: the server's is node 0, the others are ``trainbus agent``
commands (:func:`run_node_agent`) that meet it at the job's rendezvous. How the ranks agree on
commands and figures is ``worker/_agreement.py``; ``docs/DISTRIBUTED.md`` tells it whole.

The supervisor supervises the agent as it does any worker: a signal to the agent reaches every
rank (the agent forwards SIGTERM; a rank gets SIGKILL when the agent dies, whatever killed it).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import logging
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psutil

from trainbus.bus import ControlChannel, EventBus

from ._agreement import DistributedTrainer, clear_lost_peers, lost_peer_path
from ._rank_progress import clear_progress, rank_pids
from ._runs import RESUME_STATE_FILE, _load_kept_state
from ._spec import DistributedSpec, JobSpec
from ._trainer import Outcome
from ._worker_process import EXIT_INTERRUPTED, WorkerSetup, _run

__all__ = [
    "EXIT_HOSTS_MISSING",
    "EXIT_RANK_FAILED",
    "FAILURE_FILE",
    "hosts_rendezvous",
    "rank_failure",
    "run_agent",
    "run_node_agent",
]

logger = logging.getLogger(__name__)

EXIT_RANK_FAILED = 4
"""The agent's exit code when a rank failed and the agent ended the others."""

EXIT_HOSTS_MISSING = 5
"""The agent's exit code when the agents of the job's other hosts did not all join in time."""

FAILURE_FILE = "ranks/failure.txt"
"""Where the agent says, in the job's folder, which rank failed first and how."""


_PR_SET_PDEATHSIG = 1


def rank_failure(job_dir: Path) -> str | None:
    """What the agent of the job's last run said about the rank that failed (None: none)."""
    try:
        return (job_dir / FAILURE_FILE).read_text().strip() or None
    except OSError:
        return None


def hosts_rendezvous(spec: Mapping[str, Any], configured: str) -> str | None:
    """Where the agents of a job on several hosts meet: the configured ``host:port``, with a
    free port of that host when its port is 0 (None: a job on one host, whose agent takes a
    free port itself)."""
    distributed = spec.get("distributed") or {}
    if int(distributed.get("nnodes", 1)) <= 1:
        return None
    host, _, port = configured.rpartition(":")
    if port != "0":
        return configured
    with socket.create_server((host, 0)) as probe:  # the agent binds it a moment later
        return f"{host}:{probe.getsockname()[1]}"


def run_agent(setup: WorkerSetup) -> int:
    """Run the job's ranks of this host under torch's elastic agent until they end; the
    worker's exit code (rank 0's, :data:`EXIT_RANK_FAILED` or :data:`EXIT_HOSTS_MISSING`)."""
    return _launch(setup, node_rank=0)


def run_node_agent(
    job_id: str, spec: Mapping[str, Any], rendezvous: str, node_rank: int, data_dir: Path
) -> tuple[int, str | None]:
    """Run the ranks of host ``node_rank`` (1 or more) of a job on several hosts: they meet
    the server's agent at ``rendezvous`` and train with rank 0, publishing nothing. Returns
    the agent's exit code (0 once the job's training ended on every rank) and, for another,
    what failed. The ranks' records and the agent's temporary files go to
    ``<data_dir>/nodes/<job_id>``; a CSV dataset is read from ``data_dir`` as on the server."""
    setup = WorkerSetup(
        job_id=job_id,
        spec=dict(spec),
        job_dir=data_dir / "nodes" / job_id,
        data_dir=data_dir,
        url="",
        token="",
        rendezvous=rendezvous,
    )
    setup.job_dir.mkdir(parents=True, exist_ok=True)
    torch_agent_log = logging.getLogger("torch.distributed.elastic.agent.server.api")
    torch_agent_log.addFilter(_exit_barrier_race)
    try:
        code = _launch(setup, node_rank=node_rank)
    finally:
        torch_agent_log.removeFilter(_exit_barrier_race)
    return code, None if code == 0 else rank_failure(setup.job_dir)


def _exit_barrier_race(record: logging.LogRecord) -> bool:
    """Host 0's agent holds the rendezvous store and closes it once the agents' exit barrier
    has passed, which another host's agent may see before the barrier's last reply and log,
    with a traceback, as an error of a run that ended well: left out."""
    return not record.getMessage().startswith("Error waiting on exit barrier")


def _launch(setup: WorkerSetup, *, node_rank: int) -> int:
    from torch.distributed import DistStoreError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    section = JobSpec.model_validate(setup.spec).distributed
    assert section is not None
    failure = setup.job_dir / FAILURE_FILE
    failure.parent.mkdir(parents=True, exist_ok=True)
    failure.unlink(missing_ok=True)
    clear_lost_peers(setup.job_dir)
    clear_progress(setup.job_dir)
    # the agent's and the ranks' temporary files (torchelastic_*) stay in the job's folder
    temporary = setup.job_dir / "tmp"
    temporary.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(temporary)
    tempfile.tempdir = None
    ranks = section.nproc_per_node * section.nnodes
    try:
        returned = elastic_launch(_launch_config(setup, section, node_rank), _rank_main)(setup)
    except ChildFailedError as error:
        rank, first = error.get_first_failure()
        if first.exitcode < 0:
            how = f"was killed by {first.signal_name()}"
        else:
            how = f"exited with code {first.exitcode}"
        lost = lost_peer_path(setup.job_dir, rank)
        if lost.exists():  # it ended because a rank of another host was gone
            message = f"rank {rank} of {ranks} (pid {first.pid}) {how}: {lost.read_text()}"
        else:
            message = (
                f"rank {rank} of {ranks} (pid {first.pid}) {how}; the agent ended the other ranks"
            )
            if section.nnodes > 1:
                message = f"{message} of host {node_rank}"
        logger.error("job %s: %s", setup.job_id, message)
        failure.write_text(message + "\n")
        return EXIT_RANK_FAILED
    except SignalException as error:
        logger.warning("job %s: the agent got signal %s", setup.job_id, error.sigval)
        return EXIT_INTERRUPTED
    except DistStoreError as error:  # the static rendezvous's store: a host never came
        waited = section.join_timeout_seconds
        if node_rank == 0:
            message = (
                f"the agents of the job's other hosts did not all join within {waited} s "
                f"({error}): start `trainbus agent {setup.job_id} --node-rank N` on each "
                f"other host, N from 1 to {section.nnodes - 1}, while the job runs"
            )
        else:
            message = f"could not join the job's rendezvous at {setup.rendezvous}: {error}"
        logger.error("job %s: %s", setup.job_id, message)
        failure.write_text(message + "\n")
        return EXIT_HOSTS_MISSING
    code = returned.get(node_rank * section.nproc_per_node)
    return code if isinstance(code, int) else 0


def _launch_config(setup: WorkerSetup, section: DistributedSpec, node_rank: int) -> Any:
    """The elastic agent's configuration: on one host a c10d rendezvous on a free port;
    across hosts torch's static rendezvous (``torchrun --node-rank``), whose node 0, the
    server's host, runs ranks 0 to ``nproc_per_node - 1``: c10d's rendezvous numbers hosts in
    the order of their names, and rank 0 must be on the server's host, where the job's
    credential, checkpoints and records are."""
    from torch.distributed.launcher.api import LaunchConfig

    several = section.nnodes > 1
    return LaunchConfig(
        min_nodes=section.nnodes,
        max_nodes=section.nnodes,
        nproc_per_node=section.nproc_per_node,
        run_id=setup.job_id,
        rdzv_backend="static" if several else "c10d",
        rdzv_endpoint=setup.rendezvous,
        rdzv_configs=(
            {"rank": node_rank, "timeout": section.join_timeout_seconds} if several else {}
        ),
        max_restarts=0,
        monitor_interval=0.1,
        start_method="fork",  # the agent has torch and trainbus imported: ranks start at once
        signals_to_handle="SIGTERM,SIGINT",
    )


def _rank_main(setup: WorkerSetup) -> int:
    """One rank: rank 0 runs as the job's worker, the others train alongside it."""
    import torch.distributed as dist

    _die_with_agent()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ["LOCAL_RANK"])
    distributed = setup.spec["distributed"]
    ranks = int(distributed["nproc_per_node"])
    spec = dict(setup.spec)
    threads = spec.get("torch_threads")
    if isinstance(threads, int):  # the job's share of the cores, split between its ranks
        spec["torch_threads"] = max(1, threads // ranks)
    visible = [part for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part]
    if len(visible) >= ranks:  # one CUDA device for each rank
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank]
    setup = dataclasses.replace(setup, spec=spec)
    if rank != 0:  # these ranks end through rank 0, or when the others are gone (below)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    section = JobSpec.model_validate(setup.spec).distributed
    assert section is not None
    timeout = timedelta(seconds=section.collective_timeout_seconds)
    dist.init_process_group(section.backend, timeout=timeout)
    trainer_type = functools.partial(DistributedTrainer, job_dir=setup.job_dir)
    if rank == 0:
        return anyio.run(functools.partial(_run, setup, trainer_type, save_when_server_gone=False))
    return anyio.run(_follow, setup)


async def _follow(setup: WorkerSetup) -> int:
    """A rank other than 0: train with the job's spec, publishing nothing, and apply the
    commands rank 0 broadcasts."""
    spec = JobSpec.model_validate(setup.spec)
    state = _resume_state(setup) if setup.resumed else None
    async with EventBus() as bus:
        channel = ControlChannel(setup.job_id)
        trainer = await anyio.to_thread.run_sync(
            lambda: DistributedTrainer(
                job_id=setup.job_id,
                spec=spec,
                bus=bus,
                control=channel,
                job_dir=setup.job_dir,
                data_dir=setup.data_dir,
                fit_epoch_end_timeout=setup.fit_epoch_end_timeout,
            )
        )
        # the agent's SIGTERM ends this rank only through rank 0 (a stop or an interrupt
        # that every rank agrees on), or at once when the other ranks are gone
        signal.signal(signal.SIGTERM, lambda *_: _asked_to_end(trainer, setup.job_dir))
        if state is not None:
            trainer.load_state_dict(state)
        result = await anyio.to_thread.run_sync(trainer.run)
    logger.info("rank %d ended %s", trainer.rank, result.outcome.value)
    if result.outcome is Outcome.FAILED:  # the agent names this rank and ends the others
        error = result.error or {}
        raise RuntimeError(
            f"rank {trainer.rank} failed: {error.get('type')}: {error.get('message')}"
        )
    return 0


def _asked_to_end(trainer: DistributedTrainer, job_dir: Path) -> None:
    if trainer.end_requested.is_set():
        return
    trainer.end_requested.set()
    threading.Thread(target=_exit_once_rank_0_is_gone, args=(job_dir,), daemon=True).start()


def _exit_once_rank_0_is_gone(job_dir: Path) -> None:
    """A rank hung in its own code cannot end through rank 0: exit once rank 0 is gone (the
    agent would otherwise wait half a minute for it before its SIGKILL)."""
    try:
        rank_0 = psutil.Process(rank_pids(job_dir)[0])  # this run's: each run clears them
    except (KeyError, psutil.Error):
        os._exit(1)
    while True:
        try:
            if rank_0.status() == psutil.STATUS_ZOMBIE:
                os._exit(1)
        except psutil.Error:
            os._exit(1)
        time.sleep(0.1)  # the agent reaps rank 0 at its own pace: poll


def _resume_state(setup: WorkerSetup) -> dict[str, Any] | None:
    """The state rank 0 resumes from, read before rank 0 may remove it."""
    state = _load_kept_state(setup.job_dir / RESUME_STATE_FILE)
    if state is None and setup.checkpoint_loader is not None:
        state = setup.checkpoint_loader(setup.job_id, setup.job_dir)
    return state


def _die_with_agent() -> None:
    """Get SIGKILL when the agent dies, however it died: no rank outlives its job's agent."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:  # the agent died before the request took hold
        os._exit(1)
