"""What every worker process inherits from the fork server."""

from __future__ import annotations

import gc
import multiprocessing
from multiprocessing.connection import Connection

from trainbus.worker import DEFAULT_PRELOAD, WorkerProcesses


def _send_freeze_count(connection: Connection) -> None:
    connection.send(gc.get_freeze_count())
    connection.close()


def test_a_worker_starts_with_the_preloaded_heap_out_of_the_collectors_reach() -> None:
    """A worker's full garbage collections walk only what its job allocated, not the
    hundreds of thousands of objects of torch and trainbus it inherits (walking them cost a
    job's event loop half its CPU, bench/concurrency.py)."""
    WorkerProcesses(preload=DEFAULT_PRELOAD).warm()
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_send_freeze_count, args=(sender,))
    process.start()
    sender.close()
    try:
        assert receiver.poll(60), "the worker did not answer"
        frozen = receiver.recv()
    finally:
        process.join(timeout=30)
    assert process.exitcode == 0
    assert frozen > 100_000, f"only {frozen} objects frozen: torch alone has more"
