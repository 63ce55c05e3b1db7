"""The durable checkpoint layout: writing, verifying, loading, retention and clean-up.

Layout of one job's checkpoints::

    <job_dir>/checkpoints/
        epoch-0004-step-00000120/       one folder per checkpoint, never modified once renamed
            state.pt                    torch.save of the trainer's state (tensors, plain data)
            manifest.json               written last: sha256 and size of each file, epoch, step,
                                        metrics, monitored value, reason, torch and format version
        latest.json                     pointer to the newest checkpoint (moved after the rename)
        best.json                       pointer to the best checkpoint by the monitored metric
        .tmp-*                          work in progress; removed at start-up

A checkpoint is written into ``.tmp-<name>-<random>/`` on the same filesystem with ``os``
calls (a short ``os.write`` is followed by the rest, never taken for the whole), every file is
fsynced, ``manifest.json`` is written last, the folder is renamed to ``<name>`` and the parent
folder fsynced. Names are unique (a suffix is added if needed), so a rename never replaces a
checkpoint. Only then does a pointer move (written the same way: temporary file, fsync,
``os.replace``, fsync), and only then are checkpoints outside the retention deleted.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from trainbus.bus import Mode

from ._checkpoint_layout import (
    _ALIASES,
    FORMAT_VERSION,
    MANIFEST_FILE,
    STATE_FILE,
    TEMP_PREFIX,
    CheckpointInfo,
    _finite_or_none,
    checkpoints_dir,
    list_checkpoints,
    read_pointer,
)

__all__ = [
    "apply_retention",
    "clean_orphans",
    "last_serial",
    "write_checkpoint",
    "write_pointer",
]

# -- writing ----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd``: ``os.write`` may take only part of it (a signal, a
    filling disk), and the rest must follow, or the file would silently lack bytes."""
    while data:
        written = os.write(fd, data)
        if written <= 0:  # never seen on Linux; looping on it would never end
            raise OSError(errno.EIO, f"write accepted {written} bytes")
        data = data[written:]


class _HashingSink(io.RawIOBase):
    """A file descriptor as a binary stream that hashes and counts what goes through it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha256.update(view)
        _write_all(self.fd, view)
        self.size += view.nbytes
        return view.nbytes


def _create(path: Path) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    return os.open(path, flags, 0o644)


def _make_dirs(directory: Path) -> None:
    """Create ``directory`` (and missing parents) durably: a folder whose entry is lost to a
    power cut takes every checkpoint in it along."""
    if directory.is_dir():
        return
    _make_dirs(directory.parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory)
    _fsync_dir(directory.parent)


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    fd = _create(path)
    try:
        _write_all(fd, memoryview(json.dumps(payload, indent=2, sort_keys=True).encode()))
        os.fsync(fd)
    finally:
        os.close(fd)


def _unique_name(directory: Path, base: str) -> str:
    name, suffix = base, 1
    while (directory / name).exists():
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def last_serial(infos: Iterable[CheckpointInfo]) -> int:
    """The highest serial among ``infos`` (0 for none): the next checkpoint takes one more."""
    return max((info.serial for info in infos), default=0)


def write_checkpoint(
    job_dir: Path,
    state: Mapping[str, Any],
    *,
    epoch: int,
    step: int,
    reason: str,
    metrics: Mapping[str, float] | None = None,
    monitor: str | None = None,
    name: str | None = None,
    serial: int | None = None,
    weights: Mapping[str, Any] | None = None,
) -> CheckpointInfo:
    """Write ``state`` durably as a new checkpoint of the job and return its description.

    The name defaults to ``epoch-<epoch + 1>-step-<step>`` (epochs counted from 1, as users
    read them everywhere else; ``epoch`` and the manifest keep the 0-based index); a suffix
    keeps it unique. ``serial``
    (the order of checkpoints) defaults to one more than the highest on disk; a writer that
    knows it passes it. ``weights`` (when the model's weights are not the last trained ones,
    e.g. the best epoch's) is written to the manifest as it is. Pointers and retention are
    left to the caller (:func:`write_pointer`, :func:`apply_retention`).
    """
    directory = checkpoints_dir(job_dir)
    _make_dirs(directory)
    name = _unique_name(directory, name or f"epoch-{epoch + 1:04d}-step-{step:08d}")
    temp = directory / f"{TEMP_PREFIX}{name}-{secrets.token_hex(4)}"
    os.mkdir(temp)
    try:
        clean_metrics = {
            str(k): float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)
        }
        fd = _create(temp / STATE_FILE)
        try:
            hashing = _HashingSink(fd)
            with io.BufferedWriter(hashing, buffer_size=1 << 20) as buffered:
                torch.save(state, buffered)
            os.fsync(fd)
        finally:
            os.close(fd)
        manifest = {
            "format_version": FORMAT_VERSION,
            "serial": (
                last_serial(list_checkpoints(job_dir)) + 1 if serial is None else int(serial)
            ),
            "epoch": int(epoch),
            "step": int(step),
            "reason": reason,
            "metrics": {k: v for k, v in clean_metrics.items() if math.isfinite(v)},
            "monitor": monitor,
            "monitor_value": _finite_or_none(clean_metrics.get(monitor)) if monitor else None,
            "created_at": time.time(),
            "torch_version": torch.__version__,
            "files": {STATE_FILE: {"sha256": hashing.sha256.hexdigest(), "size": hashing.size}},
        }
        if weights is not None:
            manifest["weights"] = dict(weights)
        _write_json(temp / MANIFEST_FILE, manifest)
        _fsync_dir(temp)
        final = directory / name
        os.rename(temp, final)
    except BaseException:
        # A failed write (disk full, I/O error) leaves nothing behind: a half-written folder
        # would hold on to the space the next checkpoint needs until the next start-up.
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    return CheckpointInfo.from_manifest(final, manifest)


def write_pointer(job_dir: Path, which: Literal["latest", "best"], info: CheckpointInfo) -> None:
    """Point ``latest`` or ``best`` at ``info`` atomically (temporary file, fsync, replace)."""
    directory = checkpoints_dir(job_dir)
    target = directory / _ALIASES[which]
    temp = directory / f"{TEMP_PREFIX}{which}-{secrets.token_hex(4)}.json"
    try:
        _write_json(temp, {"name": info.name, "serial": info.serial, "step": info.step})
        os.replace(temp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)  # the pointer keeps its previous target
        raise
    _fsync_dir(directory)


# -- retention and clean-up -------------------------------------------------------------------


def apply_retention(
    job_dir: Path,
    *,
    keep_last: int,
    keep_best: int,
    mode: Mode,
    protect: Iterable[str] = (),
    infos: list[CheckpointInfo] | None = None,
    pointed: Iterable[str | None] | None = None,
) -> list[str]:
    """Delete checkpoints beyond the ``keep_last`` newest and the ``keep_best`` best.

    The newest checkpoint, the ones the pointers name, and ``protect`` are always kept.
    ``infos``: :func:`list_checkpoints` of the job, and ``pointed``: the names the ``latest``
    and ``best`` pointers hold, when the caller knows them (else both are read from disk).
    Returns the deleted names.
    """
    if infos is None:
        infos = list_checkpoints(job_dir)
    keep = {info.name for info in infos[: max(keep_last, 1)]}
    sign = 1.0 if mode == "min" else -1.0
    scored = [
        (sign * info.monitor_value, info.name) for info in infos if info.monitor_value is not None
    ]
    scored.sort()
    keep.update(name for _, name in scored[: max(keep_best, 0)])
    keep.update(protect)
    if pointed is None:
        pointed = (read_pointer(job_dir, "latest"), read_pointer(job_dir, "best"))
    keep.update(name for name in pointed if name is not None)
    deleted = []
    for info in infos:
        if info.name not in keep:
            _remove_tree(info.path)
            deleted.append(info.name)
    return deleted


def _remove_tree(path: Path) -> None:
    # Rename first so that a kill half-way leaves a temporary folder, never a checkpoint
    # folder with its manifest gone or its state half deleted.
    doomed = path.with_name(f"{TEMP_PREFIX}deleted-{path.name}-{secrets.token_hex(4)}")
    try:
        os.rename(path, doomed)
    except OSError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def clean_orphans(job_dir: Path) -> list[str]:
    """Remove temporary folders and files left by interrupted writes; return their names.

    Call at start-up, before any writer of this job runs.
    """
    directory = checkpoints_dir(job_dir)
    if not directory.is_dir():
        return []
    removed = []
    for path in directory.iterdir():
        if path.name.startswith(TEMP_PREFIX):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
            removed.append(path.name)
    if removed:
        _fsync_dir(directory)
    return removed
