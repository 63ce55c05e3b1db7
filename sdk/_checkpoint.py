"""The SDK's own checkpoint of a run: one file, written atomically and loaded with
``weights_only=True``.

A run that passes its model (and optimizer) to :func:`trainbus.sdk.init` gets a checkpoint at
each epoch's end and on every save command, and, when its process starts again with the same
run id, continues from it. A crash mid-write leaves the previous checkpoint whole: the new one
is written to a temporary file, flushed to disk, then renamed over the old.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_run_checkpoint", "save_run_checkpoint"]

FILE_NAME = "last.pt"


def save_run_checkpoint(folder: Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``folder/last.pt`` atomically; the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / FILE_NAME
    temporary = folder / f".{FILE_NAME}.{os.getpid()}.tmp"
    try:
        with temporary.open("wb") as file:
            torch.save(state, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
    _sync_folder(folder)
    return path


def load_run_checkpoint(folder: Path) -> dict[str, Any] | None:
    """The run's checkpoint in ``folder`` (tensors and plain data only), or None."""
    path = folder / FILE_NAME
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} is not a trainbus run checkpoint")
    return state


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX: fsync the folder)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
