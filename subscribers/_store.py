"""The event store: every event in SQLite (WAL), written in batched transactions.

Two tables. ``events`` holds one row per event of the rarer kinds (epochs, checkpoints,
commands, job lifecycle), so that reading a job's epochs never touches its batches.
``batch_events`` holds the per-batch events (``trainbus.bus.BATCH_EVENT_TYPES``: four a training
batch, two a validation batch) as chunks: one row for each job's batch events of one write,
a JSON array of ``[seq, type, time, data]``. A row per batch event cost SQLite ~5 us an
event to parse and index, CPU that a small model's training run pays for (figures in
docs/PERFORMANCE.md). Reads merge both tables in ``seq`` order; databases with one row per
batch event read as well.
"""

from __future__ import annotations

import contextlib
import functools
import heapq
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from itertools import chain, islice
from operator import itemgetter
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import anyio

from trainbus.bus import (
    BATCH_EVENT_TYPES,
    TERMINAL_JOB_EVENT_TYPES,
    DeliveryPolicy,
    Event,
    EventType,
    Subscriber,
    event_type_for,
)

__all__ = ["EventStore"]

KeepBatchEvents = Literal["all", "every_n", "none_after_end"]

_SCHEMA = (
    """
    CREATE TABLE IF NOT EXISTS events (
        job_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        type TEXT NOT NULL,
        time REAL NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, seq)
    ) WITHOUT ROWID
    """,
    # A chunk's rows are large (a JSON array of up to a whole write's batch events): a rowid
    # table with the key as an index, not WITHOUT ROWID, which suits small rows only.
    """
    CREATE TABLE IF NOT EXISTS batch_events (
        job_id TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        first_seq INTEGER NOT NULL,
        count INTEGER NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (job_id, last_seq)
    )
    """,
    # Per job, how far its worker's events are stored (see ``mark_worker``).
    """
    CREATE TABLE IF NOT EXISTS worker_marks (
        job_id TEXT PRIMARY KEY,
        session TEXT NOT NULL,
        number INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
    # Per job, a seq at or above every seq the live stream may have sent (see ``reserve``).
    """
    CREATE TABLE IF NOT EXISTS seq_reservations (
        job_id TEXT PRIMARY KEY,
        reserved INTEGER NOT NULL
    ) WITHOUT ROWID
    """,
)
_MARK = (
    "INSERT INTO worker_marks VALUES (?, ?, ?) ON CONFLICT (job_id) "
    "DO UPDATE SET session = excluded.session, number = excluded.number"
)
_RESERVE = (
    "INSERT INTO seq_reservations VALUES (?, ?) ON CONFLICT (job_id) "
    "DO UPDATE SET reserved = MAX(reserved, excluded.reserved)"
)
RESERVE_AHEAD = 8192
"""How far past the last stored seq a job's reservation reaches: more than the store's buffer
and batch, so the live stream waits for a reservation only when the store falls far behind
(a crash costs the job at most this many seq numbers, never a reused one)."""
_INSERT_CHUNK = "INSERT OR REPLACE INTO batch_events VALUES (?, ?, ?, ?, ?)"
# A batch of a job's events goes in as one JSON array, which SQLite takes apart itself
# (json_each): encoding the array is one orjson call, and SQLite parses and inserts it with the
# GIL released. Inserting Python tuples instead holds the GIL for ~1.5 us an event to bind
# the parameters, time a training thread waiting for the GIL loses: the store's share of a tiny
# training run (bench/overhead.py, 60,000 samples, the store alone attached) fell from +5.7%
# to +2.9% with this. The text SQLite extracts is byte for byte what orjson wrote.
_INSERT_JSON = (
    "INSERT OR REPLACE INTO events SELECT ?, json_extract(value, '$[0]'), "
    "json_extract(value, '$[1]'), json_extract(value, '$[2]'), json_extract(value, '$[3]') "
    "FROM json_each(?)"
)
# Events orjson cannot write as they are (NaN, which it writes as null; non-string keys; big
# integers) go in as rows of parameters, up to _ROWS_PER_INSERT a statement (5 parameters
# each, under SQLite's historical limit of 999).
_ROWS_PER_INSERT = 100
_BATCH_TYPES = tuple(sorted(t.value for t in BATCH_EVENT_TYPES))
_seq_of = itemgetter(1)  # Event is a named tuple; index 1 is its seq
_json_encode = json.JSONEncoder(separators=(",", ":"), default=str).encode

try:
    import orjson
except ImportError:  # pragma: no cover - orjson is a dependency; the standard library is slower
    orjson = None  # type: ignore[assignment]

Row = tuple[str, int, EventType, float, str]


def _encode(data: Any) -> str:
    """``data`` as compact JSON, exactly as ``json.dumps`` would read back.

    orjson is several times faster, but writes NaN and infinities as ``null`` and refuses
    non-string keys and unknown types; then the standard library encodes the event.
    """
    if orjson is not None:
        try:
            encoded = orjson.dumps(data)
        except TypeError:
            return _json_encode(data)
        if b"null" not in encoded:
            return encoded.decode()
    return _json_encode(data)


def _row(event: Event) -> Row:
    return (event[0], event[1], event[2], event[3], _encode(event[4]))


def _as_json_array(events: Sequence[Event]) -> tuple[bytes | None, list[Event]]:
    """``events`` (one job's) as a JSON array of ``[seq, type, time, data]``, and the events
    that must go in as rows instead (a ``null`` in orjson's output may be a NaN it rewrote)."""
    if orjson is None:
        return None, list(events)
    items = [(e[1], e[2], e[3], e[4]) for e in events]
    try:
        payload: bytes = orjson.dumps(items)
    except TypeError:
        payload = b"null"  # some event orjson cannot write: sort them out one by one
    if b"null" not in payload:
        return payload, []
    clean: list[bytes] = []
    rest: list[Event] = []
    for event, item in zip(events, items, strict=True):
        try:
            encoded = orjson.dumps(item)
        except TypeError:
            rest.append(event)
            continue
        if b"null" in encoded:
            rest.append(event)
        else:
            clean.append(encoded)
    return (b"[" + b",".join(clean) + b"]" if clean else None), rest


def _encode_chunk(events: Sequence[Event]) -> str:
    """``events`` as a JSON array of ``[seq, type, time, data]`` (see :func:`_encode`)."""
    return _encode([(e[1], e[2], e[3], e[4]) for e in events])


def _decode_chunk(job_id: str, text: str) -> list[Event]:
    # The standard library, as for rows: orjson reads NaN as an error and an integer past 64
    # bits as a float, where json reads back exactly what json wrote.
    items = json.loads(text)
    return [Event(job_id, item[0], EventType(item[1]), item[2], item[3]) for item in items]


def _insert(connection: sqlite3.Connection, events: Sequence[Event]) -> None:
    """Insert ``events`` (one job's, in ``seq`` order): the batch events as one chunk, the
    others as rows."""
    batch = [event for event in events if event[2] in BATCH_EVENT_TYPES]
    if batch:
        connection.execute(
            _INSERT_CHUNK,
            (batch[0][0], batch[-1][1], batch[0][1], len(batch), _encode_chunk(batch)),
        )
        if len(batch) == len(events):
            return
        events = [event for event in events if event[2] not in BATCH_EVENT_TYPES]
    _insert_rows(connection, events)


def _insert_rows(connection: sqlite3.Connection, events: Sequence[Event]) -> None:
    """Insert ``events`` (one job's) as rows, with as few statements as possible."""
    payload, rest = _as_json_array(events)
    if payload is not None:
        connection.execute(_INSERT_JSON, (events[0][0], payload.decode()))
    rows = [_row(event) for event in rest]
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[start : start + _ROWS_PER_INSERT]
        connection.execute(_multi_row_insert(len(chunk)), list(chain.from_iterable(chunk)))


@functools.cache
def _multi_row_insert(rows: int) -> str:
    return "INSERT OR REPLACE INTO events VALUES " + ",".join(["(?, ?, ?, ?, ?)"] * rows)


class EventStore(Subscriber):
    """Keeps every event of every job in SQLite; the API replays history from it.

    Attach it to the bus (lossless, large batches): each batch the bus hands over is written
    in one transaction on a worker thread, never on the event loop. The bus's ``gap`` notices
    are not stored (the store writes its own after a crash, see below). The database is
    ``<data>/trainbus.db`` (shared with the job manager's ``jobs`` table), opened in WAL mode
    with a busy timeout so that both connections coexist.

    Reads (:meth:`read`, :meth:`last_seq`) and :meth:`delete_job` are synchronous and do
    SQLite I/O: call them from a thread (``anyio.to_thread.run_sync``) in async code.
    :meth:`flush` waits until everything handed to the store so far is committed.

    Batch-level events (``train_batch_end`` and the like, see ``trainbus.bus.BATCH_EVENT_TYPES``)
    can be thinned: ``keep_batch_events="all"`` keeps them; ``"every_n"`` keeps the first and then
    every ``batch_event_every``-th of each type per job; ``"none_after_end"`` keeps them while a job
    runs and deletes them when its terminal event (``job_completed``, ``job_stopped``,
    ``job_failed``) arrives. :meth:`last_seq` counts skipped events too, so
    that a reader waiting for a ``seq`` is not kept waiting.

    Seqs sent live but not yet stored when the server dies must never be reused for other
    events. So the store keeps, per job, a durable *reservation*: a seq at or above any the live
    stream may send (:meth:`reserve`, :meth:`reserved_seq`; each commit moves it
    ``RESERVE_AHEAD`` past what it stores, in the same transaction). When it opens a database
    whose reservation is past the last stored seq (the server died), it stores a ``gap`` event
    right after the reservation (``from_seq``, ``to_seq``, ``missed``: the seqs lost, whether
    used or not) and the job's numbering continues after it. :meth:`close` gives reservations
    back, so a clean restart adds no gap.

    :param path: the SQLite database file.
    :param keep_batch_events: ``all``, ``every_n`` or ``none_after_end``.
    :param batch_event_every: N for ``every_n``.
    :param busy_timeout: seconds to wait for another connection's write lock.
    """

    steers_training = False  # it records; training never waits for it

    policy = DeliveryPolicy.LOSSLESS
    # Batches of 512 behind a buffer of 2048: bigger batches lower the store's cost on a
    # training run within the noise but raise the WebSocket fan-out's p99 latency (measured
    # with bench/store.py and bench/fanout.py). The buffer absorbs a second or more of batch
    # events while another connection holds the lock.
    buffer_size = 2048
    max_batch = 512

    def __init__(
        self,
        path: Path,
        *,
        keep_batch_events: KeepBatchEvents = "all",
        batch_event_every: int = 10,
        busy_timeout: float = 10.0,
    ) -> None:
        if keep_batch_events not in ("all", "every_n", "none_after_end"):
            raise ValueError(f"unknown keep_batch_events {keep_batch_events!r}")
        if batch_event_every < 1:
            raise ValueError(f"batch_event_every must be >= 1, got {batch_event_every}")
        self.path = Path(path)
        self.keep_batch_events = keep_batch_events
        self.batch_event_every = batch_event_every
        self.busy_timeout = busy_timeout
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._seen: dict[str, int] = {}  # job -> highest seq handled (stored or skipped)
        self._committed_seq: dict[str, int] = {}  # the same, as committed (write lock held)
        self._pending_marks: dict[str, tuple[int, str, int]] = {}  # job -> seq, session, number
        self._reserved: dict[str, int] = {}  # job -> durable seq reservation (see ``reserve``)
        self._closed = False
        self._batch_counts: Counter[tuple[str, EventType]] = Counter()
        self._received = 0
        self._committed = 0
        self._progress: anyio.Event | None = None

    # -- connections ------------------------------------------------------------------------

    def _connect(self, *, writer: bool) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
        )
        connection.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
        if writer:
            # Switching the journal mode needs the database to itself: only when not WAL yet.
            if connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            for statement in _SCHEMA:
                connection.execute(statement)
        return connection

    def open(self) -> None:
        """Open the database and create the table (done on first use otherwise)."""
        self._closed = False
        with self._write_lock:
            self._write_connection()
        with self._read_lock:
            self._read_connection()

    def _recover_reservations(self, connection: sqlite3.Connection) -> None:
        """With the write lock held, on a new write connection: a reservation past a job's last
        stored seq means the server died with seqs possibly sent but not stored; store a ``gap``
        naming them after the reservation, and reserve ahead of every job's numbering again
        (a job that starts before the live stream knows the store is covered too)."""
        connection.execute("BEGIN IMMEDIATE")
        try:
            rows = connection.execute(
                "SELECT r.job_id, r.reserved, MAX("
                "COALESCE((SELECT MAX(seq) FROM events e WHERE e.job_id = r.job_id), 0), "
                "COALESCE((SELECT MAX(last_seq) FROM batch_events b WHERE b.job_id = r.job_id), 0))"
                " FROM seq_reservations r"
            ).fetchall()
            reserved: dict[str, int] = {}
            for job_id, reservation, stored in rows:
                last = int(stored)
                if int(reservation) > last:
                    gap = Event(
                        job_id,
                        int(reservation) + 1,
                        EventType.GAP,
                        time.time(),
                        {
                            "from_seq": last + 1,
                            "to_seq": int(reservation),
                            "missed": int(reservation) - last,
                            "subscriber": "event_store",
                        },
                    )
                    _insert(connection, [gap])
                    last = gap.seq
                reserved[job_id] = last + RESERVE_AHEAD
            connection.executemany(_RESERVE, reserved.items())
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")
        self._reserved = reserved

    def mark_worker(self, job_id: str, seq: int, session: str, number: int) -> None:
        """Record that the events of worker ``session`` up to ``number`` are ``job_id``'s
        events up to ``seq``: in the transaction that stores ``seq`` (now, if it is stored), so
        that after a crash :meth:`worker_mark` never names a worker event that was not stored
        and the worker sends again exactly what the store lacks. Synchronous."""
        with self._write_lock:
            if self._committed_seq.get(job_id, 0) < seq:
                self._pending_marks[job_id] = (seq, session, number)
                return
        with self._transaction() as connection:
            connection.execute(_MARK, (job_id, session, number))

    def mark_worker_nowait(self, job_id: str, seq: int, session: str, number: int) -> bool:
        """:meth:`mark_worker` where that needs no I/O and no wait (``seq`` is not committed
        yet: the mark goes into its transaction); False when the caller must call
        :meth:`mark_worker` (on a thread), for the event loop, which must not block."""
        if not self._write_lock.acquire(blocking=False):
            return False
        try:
            if self._committed_seq.get(job_id, 0) < seq:
                self._pending_marks[job_id] = (seq, session, number)
                return True
            return False
        finally:
            self._write_lock.release()

    async def wait_handled(self, job_id: str, seq: int) -> None:
        """Wait until the store has handled (committed, or skipped by its thinning) the
        events of ``job_id`` up to ``seq``; no I/O, for the event loop."""
        while self._seen.get(job_id, 0) < seq:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    def worker_mark(self, job_id: str) -> tuple[str, int] | None:
        """The worker session and number :meth:`mark_worker` last stored for ``job_id``."""
        with self._read_lock:
            row = (
                self._read_connection()
                .execute("SELECT session, number FROM worker_marks WHERE job_id = ?", (job_id,))
                .fetchone()
            )
        return None if row is None else (str(row[0]), int(row[1]))

    def reserved_seq(self, job_id: str) -> int:
        """The highest seq of ``job_id`` that may be sent live now (durably reserved)."""
        return self._reserved.get(job_id, 0)

    def reserve(self, job_id: str, seq: int) -> None:
        """Durably reserve ``job_id``'s seqs up to ``seq`` (and ``RESERVE_AHEAD`` more) before
        they are sent live. Synchronous: blocks on SQLite."""
        if self._reserved.get(job_id, 0) >= seq:
            return
        if self._closed:  # reopening would give back nothing: the seq must not be sent
            raise RuntimeError(f"the event store is closed; seq {seq} of {job_id!r} not reserved")
        with self._transaction() as connection:
            connection.execute(_RESERVE, (job_id, seq + RESERVE_AHEAD))
        self._reserved[job_id] = max(self._reserved.get(job_id, 0), seq + RESERVE_AHEAD)

    def _release_reservations(self, connection: sqlite3.Connection) -> None:
        """With the write lock held, at a clean close: every handled seq is stored, so nothing
        past it was sent; a restart continues right after the last stored seq."""
        connection.execute("DELETE FROM seq_reservations")
        self._reserved = {}

    def _write_connection(self) -> sqlite3.Connection:
        """With the write lock held."""
        if self._writer is None:
            self._writer = self._connect(writer=True)
            self._recover_reservations(self._writer)
        return self._writer

    def _read_connection(self) -> sqlite3.Connection:
        """With the read lock held."""
        if self._reader is None:
            with self._write_lock:
                self._write_connection()  # the table exists before the first read
            self._reader = self._connect(writer=False)
        return self._reader

    def close(self) -> None:
        """Close the database connections (a later call reopens them)."""
        with self._write_lock:
            self._closed = True
            if self._writer is not None:
                self._release_reservations(self._writer)
                self._writer.close()
                self._writer = None
        with self._read_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None

    def __enter__(self) -> EventStore:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------

    def write(self, events: Sequence[Event]) -> int:
        """Store ``events`` in one transaction (applying the retention); return rows written.

        Synchronous: blocks on SQLite. The subscriber calls it on a worker thread.
        """
        seen: dict[str, int] = {}
        ended: list[str] = []
        by_job: dict[str, list[Event]] = {}
        if self.keep_batch_events == "all":
            gap = EventType.GAP
            # The hot path: no per-event branching beyond gaps and the job.
            for event in events:
                if event[2] is not gap:
                    kept = by_job.get(event[0])
                    if kept is None:
                        by_job[event[0]] = [event]
                    else:
                        kept.append(event)
            seen = {job_id: kept[-1][1] for job_id, kept in by_job.items()}
        else:  # seen: skipped events count as handled too
            for event in self._thinned(events, seen, ended):
                by_job.setdefault(event[0], []).append(event)
        reserve = {
            job_id: seq + RESERVE_AHEAD
            for job_id, seq in seen.items()
            if seq + RESERVE_AHEAD // 2 > self._reserved.get(job_id, 0)
        }
        if by_job or ended or reserve or (seen and self._pending_marks):
            self._commit(by_job, ended, reserve, seen)
            for job_id, seq in reserve.items():
                if self._reserved.get(job_id, 0) < seq:
                    self._reserved[job_id] = seq
        # Only now, so that a reader never sees a seq as handled before it is readable.
        # (Per job, events arrive in seq order: the last one seen is the highest.)
        for job_id, seq in seen.items():
            if self._seen.get(job_id, 0) < seq:
                self._seen[job_id] = seq
        return sum(map(len, by_job.values()))

    def _thinned(
        self, events: Sequence[Event], seen: dict[str, int], ended: list[str]
    ) -> list[Event]:
        kept: list[Event] = []
        keep = self.keep_batch_events
        every = self.batch_event_every
        for event in events:
            event_type = event.type
            if event_type is EventType.GAP:
                continue
            job_id = event.job_id
            seen[job_id] = event.seq
            if keep == "every_n" and event_type in BATCH_EVENT_TYPES:
                key = (job_id, event_type)
                count = self._batch_counts[key]
                self._batch_counts[key] = count + 1
                if count % every:
                    continue
            elif keep == "none_after_end" and event_type in TERMINAL_JOB_EVENT_TYPES:
                ended.append(job_id)
            kept.append(event)
        return kept

    def _commit(
        self,
        by_job: dict[str, list[Event]],
        ended: list[str],
        reserve: dict[str, int],
        seen: dict[str, int],
    ) -> None:
        with self._transaction() as connection:
            for events in by_job.values():
                _insert(connection, events)
            committed = self._committed_seq
            for job_id, seq in seen.items():  # stored, or skipped by the thinning
                committed[job_id] = max(committed.get(job_id, 0), seq)
                pending = self._pending_marks.get(job_id)
                if pending is not None and pending[0] <= committed[job_id]:
                    del self._pending_marks[job_id]
                    connection.execute(_MARK, (job_id, pending[1], pending[2]))
            if reserve:
                connection.executemany(_RESERVE, reserve.items())
            marks = ",".join("?" * len(_BATCH_TYPES))
            for job_id in ended:
                connection.execute("DELETE FROM batch_events WHERE job_id = ?", (job_id,))
                # batch events stored one row each
                connection.execute(
                    f"DELETE FROM events WHERE job_id = ? AND type IN ({marks})",
                    (job_id, *_BATCH_TYPES),
                )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """The write connection, in a transaction committed at the end (rolled back on error)."""
        with self._write_lock:
            connection = self._write_connection()
            connection.execute("BEGIN IMMEDIATE")
            try:
                yield connection
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    async def on_events(self, events: Sequence[Event]) -> None:
        self._received += len(events)
        target = self._received
        try:
            await anyio.to_thread.run_sync(self.write, events)
        finally:
            self._committed = max(self._committed, target)
            if self._progress is not None:
                self._progress.set()
                self._progress = None

    async def flush(self) -> None:
        """Wait until every event handed to the store so far is committed."""
        target = self._received
        while self._committed < target:
            if self._progress is None:
                self._progress = anyio.Event()
            await self._progress.wait()

    async def on_start(self) -> None:
        await anyio.to_thread.run_sync(self.open)

    # -- reading ----------------------------------------------------------------------------

    def read(
        self,
        job_id: str,
        after_seq: int = 0,
        types: Iterable[EventType | str] | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Stored events of ``job_id`` with ``seq`` > ``after_seq``, in ``seq`` order,
        optionally only of ``types`` and at most ``limit`` of them."""
        wanted = None if types is None else frozenset(map(event_type_for, types))
        if wanted is not None and not wanted:
            return []
        if limit is not None:
            limit = max(int(limit), 0)
        query = "SELECT job_id, seq, type, time, data FROM events WHERE job_id = ? AND seq > ?"
        params: list[Any] = [job_id, after_seq]
        if wanted is not None:
            names = sorted(t.value for t in wanted)
            query += f" AND type IN ({','.join('?' * len(names))})"
            params.extend(names)
        query += " ORDER BY seq"
        if limit is not None:
            query += " LIMIT ?"
            params.append(limit)
        with self._read_lock:
            connection = self._read_connection()
            rows = [
                Event(row[0], row[1], EventType(row[2]), row[3], json.loads(row[4]))
                for row in connection.execute(query, params).fetchall()
            ]
            if wanted is not None and wanted.isdisjoint(BATCH_EVENT_TYPES):
                return rows
            chunked = self._read_chunks(connection, job_id, after_seq, wanted)
            return list(islice(_in_order(rows, chunked), limit))

    @staticmethod
    def _read_chunks(
        connection: sqlite3.Connection,
        job_id: str,
        after_seq: int,
        wanted: frozenset[EventType] | None,
    ) -> Iterator[Event]:
        """The batch events of ``job_id`` after ``after_seq`` (of ``wanted`` types), in
        ``seq`` order, decoding one chunk at a time as the caller goes on."""
        cursor = connection.execute(
            "SELECT data FROM batch_events WHERE job_id = ? AND last_seq > ? ORDER BY last_seq",
            (job_id, after_seq),
        )
        for (text,) in cursor:
            for event in _decode_chunk(job_id, text):
                if event.seq > after_seq and (wanted is None or event.type in wanted):
                    yield event

    def last_seq(self, job_id: str) -> int:
        """The highest ``seq`` of ``job_id`` the store has handled (0 if none)."""
        with self._read_lock:
            row = (
                self._read_connection()
                .execute(
                    # (SQLite's max() of several values is NULL when one of them is)
                    "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events WHERE job_id = ?1), 0), "
                    "COALESCE((SELECT MAX(last_seq) FROM batch_events WHERE job_id = ?1), 0))",
                    (job_id,),
                )
                .fetchone()
            )
        stored = int(row[0]) if row and row[0] is not None else 0
        return max(stored, self._seen.get(job_id, 0))

    def job_ids(self) -> list[str]:
        """Every job with stored events."""
        with self._read_lock:
            rows = (
                self._read_connection()
                .execute("SELECT job_id FROM events UNION SELECT job_id FROM batch_events")
                .fetchall()
            )
        return sorted(str(row[0]) for row in rows)

    def delete_job(self, job_id: str) -> int:
        """Delete every stored event of ``job_id``; return how many."""
        with self._transaction() as connection:
            (chunked,) = connection.execute(
                "SELECT COALESCE(SUM(count), 0) FROM batch_events WHERE job_id = ?", (job_id,)
            ).fetchone()
            connection.execute("DELETE FROM batch_events WHERE job_id = ?", (job_id,))
            rows = connection.execute("DELETE FROM events WHERE job_id = ?", (job_id,)).rowcount
            connection.execute("DELETE FROM seq_reservations WHERE job_id = ?", (job_id,))
        self._seen.pop(job_id, None)
        self._reserved.pop(job_id, None)
        for key in [key for key in self._batch_counts if key[0] == job_id]:
            del self._batch_counts[key]
        return int(chunked) + rows


def _in_order(rows: Iterable[Event], chunked: Iterable[Event]) -> Iterator[Event]:
    """Both (each in ``seq`` order) merged in ``seq`` order, each ``seq`` once."""
    last = 0
    for event in heapq.merge(rows, chunked, key=_seq_of):
        if event[1] > last:
            last = event[1]
            yield event
