"""Which rank of a distributed job stalled the others.

A rank that hangs (in its own code, or stopped) leaves the other ranks waiting in their next
collective, and rank 0, the job's worker, stops reporting: the stall detector or the process
group's timeout sees the job stall, but not which rank is behind it. So every rank runs a
:class:`ProgressReporter`, a thread that writes once a second, in the job's folder, the
rank's step and how long it has waited in a collective. :func:`stalled_ranks` reads them: a
rank that waits in no collective while others wait in one, or whose file stopped changing,
is the one that stalled.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainbus.sdk._agreement import waiting_since

__all__ = [
    "PROGRESS_INTERVAL",
    "ProgressReporter",
    "clear_progress",
    "rank_pids",
    "stalled_ranks",
]

PROGRESS_INTERVAL = 1.0
"""Seconds between two writes of a rank's progress."""

_STALE_AFTER = 5 * PROGRESS_INTERVAL
"""A rank whose progress is older than this has stopped running (stopped or frozen)."""


def _progress_path(job_dir: Path, rank: int) -> Path:
    return job_dir / "ranks" / f"progress-{rank}.json"


def clear_progress(job_dir: Path) -> None:
    """Remove the progress an earlier run of the job left (before its ranks start)."""
    for path in (job_dir / "ranks").glob("progress-*.json"):
        path.unlink(missing_ok=True)


class ProgressReporter:
    """Writes one rank's step and collective wait to the job's folder once a second."""

    def __init__(self, job_dir: Path, rank: int, step: Callable[[], int]) -> None:
        self.path = _progress_path(job_dir, rank)
        self.rank = rank
        self.step = step
        self._ended = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rank-{rank}-progress")
        self._thread.daemon = True  # a rank that hangs must still be able to exit

    def start(self) -> ProgressReporter:
        """Write the rank's progress now, then once a second until :meth:`stop`."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._write()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._ended.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._ended.wait(PROGRESS_INTERVAL):
            self._write()

    def _write(self) -> None:
        since = waiting_since()
        progress = {
            "rank": self.rank,
            "pid": os.getpid(),
            "step": self.step(),
            "waiting_seconds": None if since is None else round(time.monotonic() - since, 1),
            "time": time.time(),
        }
        partial = self.path.with_suffix(".partial")
        with contextlib.suppress(OSError):  # a full disk must not end the rank
            partial.write_text(json.dumps(progress))
            os.replace(partial, self.path)


def _read(job_dir: Path) -> list[dict[str, Any]]:
    ranks = []
    for path in sorted((job_dir / "ranks").glob("progress-*.json")):
        with contextlib.suppress(OSError, ValueError):
            ranks.append(json.loads(path.read_text()))
    return ranks


def rank_pids(job_dir: Path) -> dict[int, int]:
    """``rank -> pid`` of the ranks of the job's current run (each has reported once)."""
    return {int(rank["rank"]): int(rank["pid"]) for rank in _read(job_dir)}


def stalled_ranks(job_dir: Path) -> str | None:
    """Which ranks stalled the job, and how, from the ranks' progress; None when no rank
    stands out (every rank waits, or none does)."""
    ranks = _read(job_dir)
    now = time.time()
    waiting = [r for r in ranks if r["waiting_seconds"] is not None]
    behind = []
    for rank in ranks:
        quiet = now - float(rank["time"])
        if quiet > _STALE_AFTER:
            behind.append(
                f"rank {rank['rank']} (pid {rank['pid']}) stopped running at step "
                f"{rank['step']} ({quiet:.0f} s ago)"
            )
        elif rank["waiting_seconds"] is None and waiting:
            behind.append(
                f"rank {rank['rank']} (pid {rank['pid']}) stalled at step {rank['step']}, "
                "outside any collective"
            )
    if not behind or len(behind) == len(ranks):
        return None
    longest = max(waiting, key=lambda r: r["waiting_seconds"], default=None)
    if longest is not None:
        names = ", ".join(str(r["rank"]) for r in waiting)
        behind.append(
            f"rank{'s' if len(waiting) > 1 else ''} {names} waited for it in a collective "
            f"(up to {longest['waiting_seconds']:.0f} s)"
        )
    return "; ".join(behind)
