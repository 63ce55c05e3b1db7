"""Programs the program tests register on a real server (``trainbus.programs`` entry points of
a distribution the tests write): a flood of output, a failure, and a program that stands
still, each through the same ``train(run, params)`` interface operators use."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from pydantic import BaseModel, ConfigDict, Field

from trainbus.sdk import Run
from trainbus.worker import ProgramEntry

FLOOD_LINES_PER_SECOND = 20.0
FLOOD_BURST = 50


class FloodParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lines: int = Field(default=3000, ge=1)


def flood(run: Run, params: FloodParams) -> None:
    """Print far more than the log events take, from Python, from C (``os.write``) and from a
    subprocess that inherited the program's fds, plus one line over the length bound."""
    for epoch in run.epochs():
        for index in run.batches(range(params.lines)):
            print(f"flood line {index}")
        run.end_epoch(train_loss=1.0)
        if epoch == 0:
            break
    os.write(1, b"written at the fd level\n")
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; print('from a subprocess'); sys.stderr.write('its stderr\\n')",
        ],
        check=True,
    )
    print("x" * 50_000)
    print("the last line", file=sys.stderr)


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


def fail(run: Run, params: NoParams) -> None:
    print("about to fail")
    for _ in run.epochs():
        for _ in run.batches(range(3)):
            pass
        raise _broken_input()


def _broken_input() -> ValueError:
    return ValueError("the input column 'age' has strings in it")


FLOOD = ProgramEntry("flood", FloodParams, flood, "Prints more than the log events take.")
FAIL = ProgramEntry("fail", NoParams, fail, "Raises in its first epoch.")


class HangParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after_steps: int = Field(default=3, ge=0)
    seconds: float = Field(default=60.0, gt=0)


def hang(run: Run, params: HangParams) -> None:
    """Train ``after_steps`` batches, then stand still in Python code that never reaches a
    batch boundary (a deadlock, a blocking call): stalls are seen, commands are not."""
    for _ in run.epochs():
        for step in run.batches(range(1_000_000)):
            run.log_batch(1.0)
            if step + 1 >= params.after_steps:
                print("standing still", flush=True)
                deadline = time.monotonic() + params.seconds
                while time.monotonic() < deadline:
                    time.sleep(0.05)
                return


HANG = ProgramEntry("hang", HangParams, hang, "Stands still after a few steps.")


def crash(run: Run, params: NoParams) -> None:
    """A segmentation fault in native code, after a line of output."""
    import ctypes

    print("reading address 0", file=sys.stderr, flush=True)
    ctypes.string_at(0)


CRASH = ProgramEntry("crash", NoParams, crash, "Crashes in native code.")
