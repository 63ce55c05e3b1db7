"""What every worker process inherits from the fork server."""

from __future__ import annotations

import gc
import multiprocessing
import resource
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch

from trainbus.worker import DEFAULT_PRELOAD, WorkerProcesses


def _answer_of_a_worker(send_answer: Callable[[Connection], None]) -> Any:
    """What ``send_answer`` sends, run in a process of the workers' fork server."""
    WorkerProcesses(preload=DEFAULT_PRELOAD).warm()
    context = multiprocessing.get_context("forkserver")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=send_answer, args=(sender,))
    process.start()
    sender.close()
    try:
        assert receiver.poll(60), "the worker did not answer"
        answer = receiver.recv()
    finally:
        process.join(timeout=30)
    assert process.exitcode == 0
    return answer


def _send_freeze_count(connection: Connection) -> None:
    connection.send(gc.get_freeze_count())
    connection.close()


def test_a_worker_starts_with_the_preloaded_heap_out_of_the_collectors_reach() -> None:
    """A worker's full garbage collections walk only what its job allocated, not the
    hundreds of thousands of objects of torch and trainbus it inherits (walking them cost a
    job's event loop half its CPU, bench/concurrency.py)."""
    frozen = _answer_of_a_worker(_send_freeze_count)
    assert frozen > 100_000, f"only {frozen} objects frozen: torch alone has more"


def _send_page_faults_of_a_training_like_loop(connection: Connection) -> None:
    def loop() -> None:
        for _ in range(5):  # warm-up: the arena grows to what the loop needs
            _ = [torch.ones(1 << 18) for _ in range(8)]  # eight 1 MiB tensors, then freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(50):
            _ = [torch.ones(1 << 18) for _ in range(8)]
        connection.send(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)

    thread = threading.Thread(target=loop)  # a job trains on a thread of its worker
    thread.start()
    thread.join()
    connection.close()


def test_a_worker_reuses_freed_memory_instead_of_faulting_it_in_again() -> None:
    """Tensors a training thread frees each step are reused, not given back to the system
    and faulted in again (which cost a 0.5 s epoch 6%, bench/overhead.py --whole-path)."""
    faults = _answer_of_a_worker(_send_page_faults_of_a_training_like_loop)
    # 50 rounds of 8 MiB: 102,400 pages if each round faulted its memory in again
    assert faults < 2_000, f"{faults} page faults for memory the loop had freed"
