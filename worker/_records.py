"""Job records and the legal transitions between their states (``trainbus.bus.JobState``),
persisted in SQLite."""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from trainbus.bus import JobState

__all__ = ["TRANSITIONS", "JobFailure", "JobRecord", "JobStore"]


TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    JobState.QUEUED: frozenset({JobState.RUNNING, JobState.STOPPED}),
    JobState.RUNNING: frozenset(
        {
            JobState.PAUSED,
            JobState.COMPLETED,
            JobState.STOPPED,
            JobState.FAILED,
            JobState.INTERRUPTED,
        }
    ),
    JobState.PAUSED: frozenset(
        {
            JobState.RUNNING,
            JobState.COMPLETED,
            JobState.STOPPED,
            JobState.FAILED,
            JobState.INTERRUPTED,
        }
    ),
    JobState.COMPLETED: frozenset(),
    JobState.STOPPED: frozenset({JobState.QUEUED}),
    JobState.FAILED: frozenset({JobState.QUEUED}),  # resumed once the cause is fixed
    JobState.INTERRUPTED: frozenset({JobState.QUEUED}),
}
"""Legal state changes. A paused job may still complete (a controller stop at the boundary
where it paused) or fail."""


class JobFailure(BaseModel):
    """Why a job failed: the exception's type and message; for a worker process that died,
    its exit code (minus the signal that killed it) and the last lines of its log; for a
    native crash, faulthandler's report; for a job past its memory limit, that limit."""

    type: str
    message: str
    exitcode: int | None = None
    stderr_tail: str | None = None
    fatal_error: str | None = None
    memory_limit_bytes: int | None = None


class JobRecord(BaseModel):
    """What the service knows of a job."""

    id: str = Field(examples=["3f2a9c1b7d4e"])
    name: str | None = None
    state: JobState
    spec: dict[str, Any]
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    epoch: int = Field(default=0, description="Epochs completed.")
    step: int = Field(default=0, description="Optimizer steps done.")
    metrics: dict[str, float] = Field(default_factory=dict)
    stop_reason: str | None = None
    error: JobFailure | None = None
    checkpoint: str | None = Field(default=None, description="Latest checkpoint's name.")
    waiting_for: str | None = Field(
        default=None, description="For a queued job, what it waits for (never stored)."
    )
    devices: list[str] | None = Field(
        default=None,
        description="For a running or paused job, the device slots it holds (never stored).",
    )
    rendezvous: dict[str, str] | None = Field(
        default=None,
        description="For a running job on several hosts, where the agents of its other hosts "
        "join: endpoint (host:port) and run (this run's key) (never stored).",
    )


_COLUMNS = (
    "id", "name", "state", "spec", "created_at", "started_at", "ended_at",
    "epoch", "step", "metrics", "stop_reason", "error", "checkpoint",
)  # fmt: skip
_JSON_COLUMNS = {"spec", "metrics", "error"}


class JobStore:
    """The ``jobs`` table of ``<data>/trainbus.db`` (WAL), safe to use from any thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._connection.execute("PRAGMA journal_mode=WAL")
        self._connection.execute("PRAGMA synchronous=NORMAL")
        self._connection.execute("PRAGMA busy_timeout=10000")
        self._connection.execute(
            """CREATE TABLE IF NOT EXISTS jobs (
                position INTEGER PRIMARY KEY AUTOINCREMENT,
                id TEXT UNIQUE NOT NULL, name TEXT, state TEXT NOT NULL, spec TEXT NOT NULL,
                created_at REAL NOT NULL, started_at REAL, ended_at REAL,
                epoch INTEGER NOT NULL DEFAULT 0, step INTEGER NOT NULL DEFAULT 0,
                metrics TEXT NOT NULL DEFAULT '{}', stop_reason TEXT, error TEXT,
                checkpoint TEXT, queued_at REAL)"""
        )
        # Keys a client chose for a job (an SDK run's id, an Idempotency-Key): one job each.
        self._connection.execute(
            "CREATE TABLE IF NOT EXISTS job_keys (key TEXT PRIMARY KEY, job_id TEXT NOT NULL)"
        )

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @staticmethod
    def _record(row: sqlite3.Row | tuple[Any, ...]) -> JobRecord:
        values = dict(zip(_COLUMNS, row, strict=True))
        for column in _JSON_COLUMNS:
            if values[column] is not None:
                values[column] = json.loads(values[column])
        return JobRecord.model_validate(values)

    def insert(self, record: JobRecord, *, key: str | None = None) -> str:
        """Insert ``record``; with ``key``, only if no job holds that key yet. Returns the id
        of the job that holds ``key`` (``record.id`` when it was inserted)."""
        values = record.model_dump(mode="json")
        with self._transaction() as db:
            if key is not None:
                held = db.execute("SELECT job_id FROM job_keys WHERE key = ?", (key,)).fetchone()
                if held is not None:
                    return str(held[0])
                db.execute("INSERT INTO job_keys VALUES (?, ?)", (key, record.id))
            db.execute(
                f"INSERT INTO jobs ({', '.join(_COLUMNS)}, queued_at) "
                f"VALUES ({', '.join('?' for _ in _COLUMNS)}, ?)",
                [
                    json.dumps(values[c])
                    if c in _JSON_COLUMNS and values[c] is not None
                    else values[c]
                    for c in _COLUMNS
                ]
                + [time.time()],
            )
        return record.id

    def holder_of(self, key: str) -> str | None:
        """The job that holds ``key`` (None: none does)."""
        with self._lock:
            row = self._connection.execute(
                "SELECT job_id FROM job_keys WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else str(row[0])

    def update(self, job_id: str, **fields: Any) -> None:
        if "state" in fields and fields["state"] == JobState.QUEUED:
            fields["queued_at"] = time.time()
        assignments = ", ".join(f"{name} = ?" for name in fields)
        values = [
            json.dumps(value)
            if name in _JSON_COLUMNS and value is not None
            else (value.value if isinstance(value, StrEnum) else value)
            for name, value in fields.items()
        ]
        with self._transaction() as db:
            db.execute(f"UPDATE jobs SET {assignments} WHERE id = ?", [*values, job_id])

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            row = self._connection.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
        return None if row is None else self._record(row)

    def list(
        self, state: JobState | None = None, offset: int = 0, limit: int = 50
    ) -> tuple[builtins.list[JobRecord], int]:
        where, parameters = ("WHERE state = ?", [state.value]) if state else ("", [])
        with self._lock:
            total = self._connection.execute(
                f"SELECT COUNT(*) FROM jobs {where}", parameters
            ).fetchone()[0]
            rows = self._connection.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} "
                "ORDER BY position LIMIT ? OFFSET ?",
                [*parameters, limit, offset],
            ).fetchall()
        return [self._record(row) for row in rows], int(total)

    def queued_in_order(self) -> builtins.list[str]:
        """Queued jobs, first in first out (by the time they were queued)."""
        with self._lock:
            rows = self._connection.execute(
                "SELECT id FROM jobs WHERE state = ? ORDER BY queued_at, position",
                (JobState.QUEUED.value,),
            ).fetchall()
        return [row[0] for row in rows]

    def ids_in_states(self, *states: JobState) -> builtins.list[str]:
        with self._lock:
            rows = self._connection.execute(
                f"SELECT id FROM jobs WHERE state IN ({', '.join('?' for _ in states)}) "
                "ORDER BY position",
                [s.value for s in states],
            ).fetchall()
        return [row[0] for row in rows]

    def all_ids(self) -> builtins.list[str]:
        with self._lock:
            return [row[0] for row in self._connection.execute("SELECT id FROM jobs").fetchall()]

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            db.execute("DELETE FROM job_keys WHERE job_id = ?", (job_id,))
