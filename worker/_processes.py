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

FAST_EXIT = "trainbus.worker._fork_server"
"""Always the fork server's last preload: it ends at once when its server is gone."""

NO_SIGTERM = "trainbus.worker._fork_server_signals"
"""Always the fork server's first preload: a SIGTERM does not end it."""

STDERR_TAIL_LINES = 20


class WorkerProcess:
    """One running worker process."""

    def __init__(self, process: multiprocessing.process.BaseProcess, setup: WorkerSetup) -> None:
        self._process = process
        self.setup = setup
        self._oom_kills_at_start = oom_kills()
        self._sent: set[int] = set()

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
            self._sent.add(signum)
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
            if -code in self._sent:
                return f"the worker process was ended by {name}, sent by the server"
            hint = {
                "SIGKILL": self._kill_hint(),
                "SIGSEGV": " (a segmentation fault in native code)",
                "SIGBUS": " (a bus error in native code: a bad memory access)",
                "SIGABRT": " (aborted by native code, such as an allocation that failed)",
            }.get(name, "")
            return f"the worker process was killed by {name}{hint}"
        return f"the worker process exited with code {code}"

    def _kill_hint(self) -> str:
        now, before = oom_kills(), self._oom_kills_at_start
        if now is not None and before is not None and now > before:
            return (
                ": the kernel's out-of-memory killer ended a process while it ran, most "
                "likely this one (the machine, or its container, ran out of memory)"
            )
        return " (most likely for lack of memory, by the kernel's out-of-memory killer; or by hand)"

    def stderr_tail(self, lines: int = STDERR_TAIL_LINES) -> list[str]:
        """The last lines the worker wrote to its stderr (its log), less faulthandler's list
        of extension modules (one line of thousands of characters)."""
        return [
            line
            for line in tail(self.setup.log_path, lines + 1)
            if not line.startswith("Extension modules:")
        ][-lines:]

    def fatal_error(self) -> list[str]:
        """faulthandler's report of the fatal error (a segmentation fault, an abort) that
        ended the process: its first line and the stack of the thread it hit, innermost call
        first (empty when the log holds none)."""
        lines = tail(self.setup.log_path, 400)
        starts = [i for i, line in enumerate(lines) if line.startswith("Fatal Python error:")]
        if not starts:
            return []
        report: list[str] = []
        for line in lines[starts[-1] :]:
            if line.startswith(("Thread 0x", "Extension modules:")):
                break  # the other threads' stacks
            report.append(line)
        return report[:40]


def oom_kills() -> int | None:
    """How many processes the kernel's out-of-memory killer has ended since boot (Linux's
    ``/proc/vmstat``; None elsewhere)."""
    try:
        with open("/proc/vmstat") as vmstat:
            for line in vmstat:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


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
        own = (NO_SIGTERM, FAST_EXIT)
        self.preload = (NO_SIGTERM, *(name for name in preload if name not in own), FAST_EXIT)
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
