"""The events a worker that lost its server could not have confirmed, kept in the job's folder
for the next server.

A built-in job's worker whose server dies ends its run at the next batch boundary with its
state saved, so that the resume loses no completed step; the events of the steps since the
server's last acknowledgement never reached a store. The worker writes them to
``<job_dir>/unconfirmed-events.jsonl``: a header line naming the worker process (the id its
``hello`` carried), then the worker protocol's ``events`` messages it had not had
acknowledged, in order. The next server publishes them before it marks the job interrupted,
skipping what its store already holds (the store's mark of that worker process), so that the
job's stream has every step once.

While a worker runs it holds an exclusive lock on ``<job_dir>/worker.lock``, which the kernel
releases however the process ends: the next server takes the lock before it reads the file,
so it never reads one that is half written, or before the worker's last events are in it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import time
from pathlib import Path

__all__ = [
    "LOCK_FILE",
    "UNCONFIRMED_FILE",
    "hold_worker_lock",
    "read_unconfirmed",
    "set_aside_unconfirmed",
    "wait_worker_gone",
    "write_unconfirmed",
]

UNCONFIRMED_FILE = "unconfirmed-events.jsonl"
UNREADABLE_FILE = "unconfirmed-events.unreadable.jsonl"
LOCK_FILE = "worker.lock"


def _lock(fd: int, timeout: float) -> bool:
    """Take the exclusive lock on ``fd`` within ``timeout`` seconds (True: taken, or the file
    system takes no locks)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)  # polling a lock the kernel gives no wake-up for, bounded
        except OSError:
            return True  # no locks on this file system: nothing to wait for
        else:
            return True


def hold_worker_lock(job_dir: Path, timeout: float = 10.0) -> int | None:
    """Take the job's worker lock for the rest of this process's life: the descriptor (kept
    open on purpose), or None if a process of an earlier run still held it after
    ``timeout`` seconds."""
    fd = os.open(job_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    if _lock(fd, timeout):
        return fd
    os.close(fd)
    return None


def wait_worker_gone(job_dir: Path, timeout: float) -> bool:
    """Wait until no worker process of the job holds its lock (True), for at most
    ``timeout`` seconds (False). Synchronous: call it on a thread from async code."""
    try:
        fd = os.open(job_dir / LOCK_FILE, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return True  # no worker of this job ever ran here
    try:
        return _lock(fd, timeout)
    finally:
        os.close(fd)  # releases the lock too


def write_unconfirmed(job_dir: Path, lines: list[str]) -> None:
    """Write ``lines`` durably as the job's unconfirmed events (temporary file, fsync,
    rename, fsync of the folder): the next server finds all of them or none."""
    temp = job_dir / f".{UNCONFIRMED_FILE}.{secrets.token_hex(4)}"
    with temp.open("x") as file:
        file.writelines(line + "\n" for line in lines)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temp, job_dir / UNCONFIRMED_FILE)
    folder = os.open(job_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def read_unconfirmed(job_dir: Path) -> list[str] | None:
    """The lines of the job's unconfirmed events file (None: there is none)."""
    try:
        text = (job_dir / UNCONFIRMED_FILE).read_text()
    except FileNotFoundError:
        return None
    return [line for line in text.splitlines() if line]


def set_aside_unconfirmed(job_dir: Path, *, unreadable: bool = False) -> None:
    """Remove the job's unconfirmed events file once its events are stored; one that could
    not be read is kept beside it for a person to look at, and not read again."""
    path = job_dir / UNCONFIRMED_FILE
    with contextlib.suppress(FileNotFoundError):
        if unreadable:
            os.replace(path, job_dir / UNREADABLE_FILE)
        else:
            os.unlink(path)
