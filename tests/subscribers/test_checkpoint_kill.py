"""Checkpoints survive a process killed (SIGKILL) at random moments while writing them."""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from trainbus.subscribers import (
    clean_orphans,
    latest_valid_state,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)

from ..reliability.conftest import unfinished_checkpoint_entries

KILLS = 25
CHILD = Path(__file__).with_name("checkpoint_child.py")


def _lines(stream: object, sink: queue.Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        sink.put(line.strip())


def _wait_for(lines: queue.Queue[str], prefix: str, committed: list[int]) -> str:
    deadline = time.monotonic() + 60
    while True:
        line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        if line.startswith("committed "):
            committed.append(int(line.split()[3]))
        if line.startswith(prefix):
            return line


def test_sigkill_during_writes_never_loses_the_newest_committed(tmp_path: Path) -> None:
    job_dir = tmp_path / "jobs" / "kill"
    rng = random.Random(4)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    zygote = subprocess.Popen(
        [sys.executable, str(CHILD), str(job_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert zygote.stdin is not None and zygote.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_lines, args=(zygote.stdout, lines), daemon=True).start()
    committed: list[int] = []
    seen: dict[str, str] = {}  # checkpoint name -> its state hash, once verified
    interrupted = 0
    cycle_seconds = 0.05  # a moving average of the time one checkpoint takes the child
    try:
        for _ in range(KILLS):
            commits_before = len(committed)
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(_wait_for(lines, "started ", committed).split()[1])
            # Let the child commit 0-2 checkpoints (whatever the machine's speed), then kill
            # it at a random moment within about one write cycle.
            started = time.monotonic()
            for _ in range(rng.choice([0, 1, 1, 2])):
                _wait_for(lines, f"committed {pid} ", committed)
                cycle = time.monotonic() - started
                started = time.monotonic()
                cycle_seconds = 0.8 * cycle_seconds + 0.2 * cycle
            time.sleep(rng.uniform(0.0, 1.2 * cycle_seconds))  # a random moment, not a wait
            os.kill(pid, signal.SIGKILL)
            _wait_for(lines, f"exited {pid}", committed)

            newest = latest_valid_state("kill", job_dir)
            if newest is None:  # killed before its first write was durable
                assert not committed
            else:
                step = int(newest["step"])
                assert step >= max(committed, default=0)
                assert torch.all(newest["weights"] == step)
                assert torch.all(newest["moments"] == -step)
            for info in list_checkpoints(job_dir):
                verified = verify_checkpoint(job_dir, info.name)
                digest = str(verified.files["state.pt"]["sha256"])
                assert seen.setdefault(info.name, digest) == digest  # never rewritten
                state = load_checkpoint(job_dir, info.name)
                assert torch.all(state["weights"] == int(state["step"]))
            if clean_orphans(job_dir):
                interrupted += 1
            assert not unfinished_checkpoint_entries(job_dir)
            if len(committed) > commits_before:
                # retention ran at that commit (keep_last=2 + keep_best=1); a kill between
                # the next rename and its retention leaves one more
                assert len(list_checkpoints(job_dir)) <= 4
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=30)
        zygote.stdout.close()
    assert committed  # the children did write between kills
    assert interrupted > 0  # some kills landed in the middle of a write
