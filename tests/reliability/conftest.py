"""The reliability suite: faults, load and hostile input against real servers.

Every item runs in CI at a size that fits the suite's time; ``make soak`` sets
``TRAINBUS_SOAK=1`` and runs the same items longer (see ``sized``). Figures a test measures go to
``record``; with ``TRAINBUS_RELIABILITY_REPORT`` set they are appended there as JSON lines, the
source of the tables in docs/RELIABILITY.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainbus.subscribers import verify_checkpoint

SOAK = os.environ.get("TRAINBUS_SOAK") == "1"


def sized(ci: int, soak: int) -> int:
    """How many times to try something: ``ci`` in the test suite, ``soak`` under ``make soak``."""
    return soak if SOAK else ci


def record(item: str, **figures: Any) -> None:
    """Keep what a test tried and what held, for docs/RELIABILITY.md."""
    target = os.environ.get("TRAINBUS_RELIABILITY_REPORT")
    if not target:
        return
    line = {"item": item, "soak": SOAK, "time": round(time.time(), 3), **figures}
    with Path(target).open("a", encoding="utf-8") as report:
        report.write(json.dumps(line) + "\n")


def poll(
    condition: Callable[[], Any], what: str, timeout: float = 60.0, interval: float = 0.005
) -> Any:
    """``condition()``'s first truthy value, asked every ``interval`` seconds until ``timeout``
    (then the test fails naming ``what``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(interval)  # polling interval, bounded by the deadline


def unfinished_checkpoint_entries(job_dir: Path) -> list[str]:
    """Entries of a job's checkpoint folder that a finished write never leaves: temporary
    names, and folders under a final name whose manifest is missing or does not verify (a
    checkpoint written in place and cut short would be one)."""
    folder = job_dir / "checkpoints"
    if not folder.is_dir():
        return []
    unfinished = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            unfinished.append(path.name)
        elif path.is_dir():
            try:
                verify_checkpoint(job_dir, path.name)
            except Exception as error:  # any failure is what this reports
                unfinished.append(f"{path.name} ({error})")
    return unfinished
