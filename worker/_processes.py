"""Worker processes: started from a fork server that has imported torch and trainbus once, so
that a job starts in tens of milliseconds instead of the second a fresh interpreter takes to
import torch; then waited for, signalled and described when they end."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.forkserver
import os
import signal
from collections.abc import Sequence
from multiprocessing.context import ForkServerContext
from pathlib import Path

import anyio

from ._worker_process import WorkerSetup, worker_main

__all__ = ["DEFAULT_PRELOAD", "WorkerProcess", "WorkerProcesses"]

logger = logging.getLogger(__name__)

DEFAULT_PRELOAD = (
    "torch",
    "torch._dynamo",  # the first optimizer a process builds imports it: a second
    "trainbus.worker._worker_process",
    "trainbus.subscribers",
    "sklearn.datasets",
    "anyio._backends._asyncio",  # anyio imports its backend (and asyncio) at the first run
    "websockets.asyncio.client",
)
"""Imported once in the fork server: every worker starts with them loaded."""

STDERR_TAIL_LINES = 20


class WorkerProcess:
    """One running worker process."""

    def __init__(self, process: multiprocessing.process.BaseProcess, setup: WorkerSetup) -> None:
        self._process = process
        self.setup = setup

    @property
    def pid(self) -> int:
        assert self._process.pid is not None
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    async def wait(self) -> int:
        """Wait until the process has ended; its exit code (minus the signal that ended it)."""
        while True:
            code = await anyio.to_thread.run_sync(self._join, 0.25, abandon_on_cancel=True)
            if code is not None:
                return code

    def _join(self, timeout: float) -> int | None:
        self._process.join(timeout)
        return self._process.exitcode

    def signal(self, signum: int) -> None:
        """Send ``signum`` unless the process has ended."""
        if self._process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signum)

    def describe_exit(self) -> str:
        """How the process ended, as a person reads it."""
        code = self._process.exitcode
        if code is None:
            return "still running"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            hint = {
                "SIGKILL": " (killed: by a person, or by the kernel for lack of memory)",
                "SIGSEGV": " (a segmentation fault in native code)",
            }.get(name, "")
            return f"the worker process was killed by {name}{hint}"
        return f"the worker process exited with code {code}"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        """The last lines the worker wrote to its stderr (its log)."""
        return tail(self.setup.log_path, lines)


def tail(path: Path, lines: int) -> list[str]:
    """The last ``lines`` lines of ``path`` (empty if it does not exist)."""
    try:
        with path.open("rb") as file:
            file.seek(0, os.SEEK_END)
            size = file.tell()
            file.seek(max(0, size - 64 * 1024))
            text = file.read().decode(errors="replace")
    except OSError:
        return []
    return [line for line in text.splitlines() if line.strip()][-lines:]


class WorkerProcesses:
    """Starts worker processes from a fork server with ``preload`` imported."""

    def __init__(self, preload: Sequence[str] = DEFAULT_PRELOAD) -> None:
        self.preload = tuple(preload)
        self._context: ForkServerContext = multiprocessing.get_context("forkserver")
        self._context.set_forkserver_preload(list(self.preload))

    def warm(self) -> None:
        """Start the fork server now (it imports ``preload``: a second or two), so that the
        first job does not wait for it. Blocking: call it on a thread."""
        multiprocessing.forkserver.ensure_running()

    def start(self, setup: WorkerSetup) -> WorkerProcess:
        """Start a worker for ``setup`` (blocking for a few milliseconds: call on a thread)."""
        process = self._context.Process(
            target=worker_main, args=(setup,), name=f"trainbus-job-{setup.job_id}"
        )
        process.start()
        logger.info("job %s: worker process %d started", setup.job_id, process.pid)
        return WorkerProcess(process, setup)
