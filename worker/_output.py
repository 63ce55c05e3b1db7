"""A program's output, taken at the file-descriptor level: fd 1 and fd 2 point at files
(``stdout_path``, and ``stderr_path``, the worker's log), so that whatever writes to them
(Python's ``print``, a C extension, a subprocess that inherited them) is on disk the moment it
is written, and is still there when the process crashes right after (the last lines before a
crash are the ones that say why). A thread follows both files: it keeps every line in the
job's log file and publishes the lines as ``log`` events, each cut to ``max_line_chars`` and
at most ``lines_per_second`` of them (with a burst of ``burst_lines``); what the limit holds
back is counted, and the count travels with the next event that goes out (``dropped``, and
``dropped_total`` since the start)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["LogLimits", "OutputCapture", "OutputStatistics"]

Publish = Callable[..., None]
"""``publish(stream, line, **fields)``: one ``log`` event."""

_READ_BYTES = 65_536


@dataclass(frozen=True)
class LogLimits:
    """How much of a program's output becomes events, and how much its log file keeps."""

    lines_per_second: float = 50.0
    burst_lines: int = 200
    max_line_chars: int = 2000
    max_file_bytes: int = 64 * 1024 * 1024
    follow_seconds: float = 0.05
    """How often the files are looked at while nothing new came."""


@dataclass(frozen=True)
class OutputStatistics:
    """What became of a program's output lines."""

    lines: int
    published: int
    dropped: int
    truncated: int
    file_bytes: int


@dataclass
class _Followed:
    """One stream's file, read from where the capture started, and the line it is in."""

    stream: str
    fd: int
    file: BinaryIO
    held: bytes = b""
    cut: bool = False
    """The line in ``held`` was sent cut already: the rest of it goes to the log file only."""
    saved: int = field(default=-1)


class OutputCapture:
    """Takes fds 1 and 2 of this process from :meth:`start` until :meth:`stop`.

    :param log_path: the job's log file: every line of both streams, up to
        ``limits.max_file_bytes``.
    :param stdout_path: where fd 1 writes.
    :param stderr_path: where fd 2 writes (the worker's log, whose last lines say why a job
        failed).
    """

    def __init__(
        self,
        *,
        log_path: Path,
        stdout_path: Path,
        stderr_path: Path,
        publish: Publish,
        limits: LogLimits = LogLimits(),  # a frozen value
    ) -> None:
        self.log_path = log_path
        self.stdout_path = stdout_path
        self.stderr_path = stderr_path
        self.publish = publish
        self.limits = limits
        self._lock = threading.Lock()
        self._tokens = float(limits.burst_lines)
        self._refilled = time.monotonic()
        self._lines = self._published = self._dropped = self._pending = self._truncated = 0
        self._file_bytes = 0
        self._file_full = False
        self._log: BinaryIO | None = None
        self._followed: list[_Followed] = []
        self._stopping = threading.Event()
        self._follower: threading.Thread | None = None

    def start(self) -> None:
        """Point fds 1 and 2 at their files (``sys.stdout`` and ``sys.stderr`` line-buffered
        on them, so that a line is written when it is printed) and start following them."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, stream, path in ((1, "stdout", self.stdout_path), (2, "stderr", self.stderr_path)):
            target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            saved = os.dup(fd)
            os.dup2(target, fd)
            os.close(target)
            reader = open(path, "rb")  # noqa: SIM115 - closed in stop()
            reader.seek(0, os.SEEK_END)  # what an earlier run wrote is not this run's
            self._followed.append(_Followed(stream, fd, reader, saved=saved))
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        self._follower = threading.Thread(target=self._follow, name="trainbus-output", daemon=True)
        self._follower.start()

    def stop(self) -> OutputStatistics:
        """Give fds 1 and 2 back, publish what is left to read, and say what the limits held
        back in one last event."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for followed in self._followed:
            os.dup2(followed.saved, followed.fd)
            os.close(followed.saved)
        self._stopping.set()
        if self._follower is not None:
            self._follower.join()
        self._read_all(final=True)
        with self._lock:
            pending, dropped = self._pending, self._dropped
            self._pending = 0
        if dropped:  # the total, once more at the end
            self.publish(
                "trainbus",
                f"{dropped} lines of output were not sent as log events (more than "
                f"{self.limits.lines_per_second:g} lines/s); the job's log file has them",
                dropped=pending,
                dropped_total=dropped,
            )
        for followed in self._followed:
            followed.file.close()
        if self._log is not None:
            self._log.close()
        return self.statistics()

    def statistics(self) -> OutputStatistics:
        with self._lock:
            return OutputStatistics(
                lines=self._lines,
                published=self._published,
                dropped=self._dropped,
                truncated=self._truncated,
                file_bytes=self._file_bytes,
            )

    # -- following the files ----------------------------------------------------------------

    def _follow(self) -> None:
        while not self._stopping.is_set():
            if not self._read_all(final=False):
                self._stopping.wait(self.limits.follow_seconds)

    def _read_all(self, *, final: bool) -> bool:
        """Take in what each file has that was not read yet; whether there was any."""
        read = False
        for followed in self._followed:
            while chunk := followed.file.read(_READ_BYTES):
                read = True
                self._take(followed, chunk)
            if final and followed.held:
                self._end_line(followed, followed.held)
                followed.held = b""
        return read

    def _take(self, followed: _Followed, chunk: bytes) -> None:
        followed.held += chunk
        *lines, followed.held = followed.held.split(b"\n")
        for raw in lines:
            self._end_line(followed, raw)
        if len(followed.held) > self.limits.max_line_chars * 4:  # bytes of a line without end
            if followed.cut:
                self._keep(followed.held)
            else:
                self._line(followed.stream, followed.held, end=b"")
            followed.cut, followed.held = True, b""

    def _end_line(self, followed: _Followed, raw: bytes) -> None:
        if followed.cut:  # the end of a line already sent cut
            followed.cut = False
            self._keep(raw + b"\n")
        else:
            self._line(followed.stream, raw)

    def _line(self, stream: str, raw: bytes, end: bytes = b"\n") -> None:
        self._keep(raw + end)
        text = raw.decode(errors="replace").rstrip("\r")
        fields: dict[str, Any] = {}
        limit = self.limits.max_line_chars
        with self._lock:
            self._lines += 1
            if len(text) > limit:
                text = text[:limit]
                fields["truncated"] = True
                self._truncated += 1
            if not self._admit():
                self._dropped += 1
                self._pending += 1
                return
            if self._pending:
                fields.update(dropped=self._pending, dropped_total=self._dropped)
                self._pending = 0
            self._published += 1
        self.publish(stream, text, **fields)

    def _admit(self) -> bool:
        now = time.monotonic()
        limits = self.limits
        self._tokens = min(
            float(limits.burst_lines),
            self._tokens + (now - self._refilled) * limits.lines_per_second,
        )
        self._refilled = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def _keep(self, data: bytes) -> None:
        """Append to the job's log file, up to its bound."""
        with self._lock:
            if self._file_full or self._log is None:
                return
            if self._file_bytes + len(data) > self.limits.max_file_bytes:
                self._file_full = True
                data = (
                    f"[trainbus: the log file reached {self.limits.max_file_bytes} bytes; "
                    "later output is not kept]\n"
                ).encode()
            self._file_bytes += len(data)
            self._log.write(data)
