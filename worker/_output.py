"""A program's output, taken at the file-descriptor level: whatever writes to fd 1 or 2 (Python's
``print``, a C extension, a subprocess that inherited them) goes through a pipe to a reader
thread, which keeps every line in the job's log file and publishes the lines as ``log``
events, each cut to ``max_line_chars`` and at most ``lines_per_second`` of them (with a burst
of ``burst_lines``); what the limit holds back is counted, and the count travels with the next
event that goes out (``dropped``, and ``dropped_total`` since the start)."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["LogLimits", "OutputCapture", "OutputStatistics"]

Publish = Callable[..., None]
"""``publish(stream, line, **fields)``: one ``log`` event."""

_STREAMS = {1: "stdout", 2: "stderr"}
_READ_BYTES = 65_536


@dataclass(frozen=True)
class LogLimits:
    """How much of a program's output becomes events, and how much its log file keeps."""

    lines_per_second: float = 50.0
    burst_lines: int = 200
    max_line_chars: int = 2000
    max_file_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputStatistics:
    """What became of a program's output lines."""

    lines: int
    published: int
    dropped: int
    truncated: int
    file_bytes: int


class OutputCapture:
    """Takes fds 1 and 2 of this process from :meth:`start` until :meth:`stop`.

    :param log_path: the job's log file: every line of both streams, up to
        ``limits.max_file_bytes``.
    :param stderr_path: where stderr's lines go as well (the worker's log, whose last lines
        say why a job failed).
    """

    def __init__(
        self,
        *,
        log_path: Path,
        stderr_path: Path,
        publish: Publish,
        limits: LogLimits = LogLimits(),  # a frozen value
    ) -> None:
        self.log_path = log_path
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
        self._stderr_log: BinaryIO | None = None
        self._saved: dict[int, int] = {}
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        """Point fds 1 and 2 at pipes read by this capture (``sys.stdout`` and ``sys.stderr``
        are line-buffered on them, so that a line goes out when it is printed)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab", buffering=0)  # noqa: SIM115 - closed in stop()
        self._stderr_log = open(self.stderr_path, "ab", buffering=0)  # noqa: SIM115
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, name in _STREAMS.items():
            read_end, write_end = os.pipe()
            self._saved[fd] = os.dup(fd)
            os.dup2(write_end, fd)
            os.close(write_end)
            reader = threading.Thread(
                target=self._read, args=(read_end, name), name=f"trainbus-{name}", daemon=True
            )
            reader.start()
            self._readers.append(reader)
        sys.stdout = open(1, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False, errors="backslashreplace")  # noqa: SIM115

    def stop(self, timeout: float = 5.0) -> OutputStatistics:
        """Give fds 1 and 2 back, publish what the readers still hold (a process started by
        the program that keeps a pipe open is waited for ``timeout`` seconds), and say what
        the limits held back in one last event."""
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, saved in self._saved.items():
            os.dup2(saved, fd)  # the pipe's last write end here: its reader sees the end
            os.close(saved)
        self._saved.clear()
        deadline = time.monotonic() + timeout
        for reader in self._readers:
            reader.join(max(0.0, deadline - time.monotonic()))
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
        for file in (self._log, self._stderr_log):
            if file is not None:
                file.close()
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

    # -- the readers ------------------------------------------------------------------------

    def _read(self, fd: int, stream: str) -> None:
        limit = self.limits.max_line_chars * 4  # bytes held for a line without its end
        held = b""
        skipping = False  # in a line already sent cut: the rest goes to the file only
        try:
            while chunk := os.read(fd, _READ_BYTES):
                held += chunk
                *lines, held = held.split(b"\n")
                for raw in lines:
                    if skipping:  # the end of a line already sent cut
                        skipping = False
                        self._keep(stream, raw + b"\n")
                        continue
                    self._line(stream, raw)
                if len(held) > limit:
                    if not skipping:
                        self._line(stream, held, end=b"")
                    else:
                        self._keep(stream, held)
                    skipping, held = True, b""
            if held and not skipping:
                self._line(stream, held)
            elif skipping:
                self._keep(stream, held + b"\n")
        finally:
            os.close(fd)

    def _line(self, stream: str, raw: bytes, end: bytes = b"\n") -> None:
        self._keep(stream, raw + end)
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

    def _keep(self, stream: str, data: bytes) -> None:
        """Append to the log file (and stderr's to the worker's log)."""
        if stream == "stderr" and self._stderr_log is not None:
            self._stderr_log.write(data)
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
