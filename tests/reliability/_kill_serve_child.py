"""A zygote of ``trainbus serve`` processes, so that the server-kill test can start and
SIGKILL servers many times without paying the service's imports (seconds) each time.

Run as ``python _kill_serve_child.py [trainbus options]``. It imports the service and prints
``warm``. For each line on stdin (``serve`` and its options, e.g. ``serve --port 8123 --data-dir
D``) it forks a child that runs ``trainbus`` (``trainbus.api.cli.main``) with all those options and
prints ``started PID``; it prints ``exited PID STATUS`` when a child is gone. Several children
may run at once. When stdin closes it kills the children still running and exits. Nothing
runs in the zygote beyond imports, so each child starts as a fresh ``trainbus serve`` would.

A line may start with ``--store-delay SECONDS``: each of that server's event store writes waits
that long first, which widens the window in which events streamed live are not stored yet.
"""

from __future__ import annotations

import importlib
import os
import select
import signal
import sys
import time
from typing import Any

# What ``trainbus serve`` imports before it serves: the service, and torch._dynamo (seconds),
# which a job's memory estimate imports. Jobs train in worker processes, whose fork server
# imports the rest (the built-in datasets' sklearn).
_PRELOADED = (
    "torch._dynamo",
    "trainbus.api._app",
    "trainbus.api._runtime",
    "trainbus.api._server",
)


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: lines never interleave


def _fork_server(arguments: list[str]) -> int:
    from trainbus.api.cli import main as trainbus

    pid = os.fork()
    if pid:
        return pid
    status = 1
    try:
        if arguments[:1] == ["--store-delay"]:
            _delay_store_writes(float(arguments[1]))
            arguments = arguments[2:]
        # The test reads the zygote's stdout and writes its stdin: the server keeps off both.
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, 0)
        os.dup2(devnull, 1)
        status = trainbus([*sys.argv[1:], *arguments])
    finally:
        os._exit(status)


def _reap(children: set[int]) -> None:
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        children.discard(pid)
        _say(f"exited {pid} {status}")


def _delay_store_writes(seconds: float) -> None:
    from trainbus.subscribers._store import EventStore

    write = EventStore.write

    def delayed(self: EventStore, events: Any) -> int:
        time.sleep(seconds)  # on the store's writer thread: the event loop goes on
        return write(self, events)

    EventStore.write = delayed  # type: ignore[method-assign]


def main() -> int:
    for name in _PRELOADED:
        importlib.import_module(name)
    _say("warm")
    children: set[int] = set()
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)  # also the pace of reaping
        if readable:
            chunk = os.read(0, 4096)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = _fork_server(line.decode().split())
                children.add(pid)
                _say(f"started {pid}")
        _reap(children)
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    for pid in children:
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
