"""One run of a job's trainer, the same in a worker process and on a thread: restore the
state the last run kept (else its last valid checkpoint), run, keep the final state of a
resumable ending, and give the memory back."""

from __future__ import annotations

import ctypes
import gc
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ._trainer import Outcome, RunResult

if TYPE_CHECKING:
    from ._manager import JobHandle

__all__ = [
    "RESUME_STATE_FILE",
    "CheckpointLoader",
    "release_memory",
    "restore_state",
    "run_and_keep_state",
]

logger = logging.getLogger(__name__)

CheckpointLoader = Callable[[str, Path], "dict[str, Any] | None"]

RESUME_STATE_FILE = "resume-state.pt"
"""In a job's folder: the exact state its last stopped or interrupted run ended with."""


def restore_state(handle: JobHandle, checkpoint_loader: CheckpointLoader | None) -> bool:
    """Load the previous run's state into the handle's trainer: the state that run wrote as
    it ended, if any, else the last valid checkpoint; False with neither (it starts over).
    A state that fails to load raises and stays where it is, for a resume once the cause is
    fixed. (Everything here is a local of this call: an idle worker thread keeps the
    arguments of its last call, and they must not be the trainer or a state's tensors.)"""
    trainer = handle.trainer
    assert trainer is not None
    kept = handle.job_dir / RESUME_STATE_FILE
    state = _load_kept_state(kept)
    source = "the state its last run kept"
    if state is None and checkpoint_loader is not None:
        state = checkpoint_loader(handle.id, handle.job_dir)
        source = "checkpoint"
    if state is None:
        return False
    trainer.load_state_dict(state)
    kept.unlink(missing_ok=True)  # loaded: the checkpoints take over from here
    logger.info("job %s resumes from %s at step %d", handle.id, source, trainer.step)
    return True


def run_and_keep_state(handle: JobHandle) -> RunResult:
    """Run the handle's trainer; for a resumable ending, write its exact state for the next
    run (the job's checkpoints may be off, or older), so that no tensor stays in memory
    meanwhile. Takes the handle, not the trainer: an idle worker thread keeps the arguments of
    its last call."""
    trainer = handle.trainer
    assert trainer is not None
    result = trainer.run()
    if result.outcome in (Outcome.STOPPED, Outcome.INTERRUPTED):
        try:
            temporary = handle.job_dir / f".{RESUME_STATE_FILE}.tmp"
            torch.save(trainer.state_dict(), temporary)
            os.replace(temporary, handle.job_dir / RESUME_STATE_FILE)
        except OSError:  # the checkpoints remain to resume from
            logger.exception("job %s: its final state was not kept", trainer.job_id)
    return result


def release_memory() -> None:
    """Free an ended run's model and data now and give the memory back to the system: the
    trainer is part of reference cycles (its callbacks), which wait for the garbage collector,
    and glibc keeps freed memory for the process unless asked to trim it."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def _find_malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return None
    return trim


_malloc_trim = _find_malloc_trim()


def _load_kept_state(path: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = torch.load(path, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # e.g. cut short by a power loss: the checkpoints remain
        logger.exception("the kept state %s does not load; resuming from a checkpoint", path)
        return None
    return state
