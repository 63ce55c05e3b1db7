"""The durable checkpoint layout: writing, verifying, loading, retention and clean-up.

Layout of one job's checkpoints::

    <job_dir>/checkpoints/
        epoch-0003-step-00000120/       one folder per checkpoint, never modified once renamed
            state.pt                    torch.save of the trainer's state (tensors, plain data)
            manifest.json               written last: sha256 and size of each file, epoch, step,
                                        metrics, monitored value, reason, torch and format version
        latest.json                     pointer to the newest checkpoint (moved after the rename)
        best.json                       pointer to the best checkpoint by the monitored metric
        .tmp-*                          work in progress; removed at start-up

A checkpoint is written into ``.tmp-<name>-<random>/`` on the same filesystem, every file is
fsynced, ``manifest.json`` is written last, the folder is renamed to ``<name>`` and the parent
folder fsynced. Names are unique (a suffix is added if needed), so a rename never replaces a
checkpoint. Only then does a pointer move (written the same way: temporary file, fsync,
``os.replace``, fsync), and only then are checkpoints outside the retention deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import pickle
import secrets
import shutil
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ._errors import CheckpointCorrupt, CheckpointNotFound, UnsafeCheckpoint

__all__ = [
    "FORMAT_VERSION",
    "CheckpointInfo",
    "apply_retention",
    "checkpoint_path",
    "checkpoints_dir",
    "clean_orphans",
    "is_better",
    "latest_valid_state",
    "list_checkpoints",
    "load_checkpoint",
    "read_pointer",
    "verify_checkpoint",
    "write_checkpoint",
    "write_pointer",
]

logger = logging.getLogger("trainbus.subscribers")

FORMAT_VERSION = 1
"""Version of the checkpoint layout and manifest written by this code."""

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"
TEMP_PREFIX = ".tmp-"
_ALIASES = {"latest": LATEST_POINTER, "last": LATEST_POINTER, "best": BEST_POINTER}

Mode = Literal["min", "max"]


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What a checkpoint's manifest says about it.

    ``serial`` orders checkpoints of a job by when they were written (1, 2, ...);
    ``monitor_value`` is the monitored metric at save time (None when absent or not finite).
    """

    name: str
    path: Path
    serial: int
    epoch: int
    step: int
    reason: str
    metrics: Mapping[str, float]
    monitor: str | None
    monitor_value: float | None
    bytes: int
    created_at: float
    torch_version: str
    format_version: int
    files: Mapping[str, Mapping[str, Any]] = field(repr=False)

    @property
    def state_file(self) -> Path:
        """The checkpoint's ``state.pt`` (load it with ``torch.load(..., weights_only=True)``)."""
        return self.path / STATE_FILE

    def to_dict(self) -> dict[str, Any]:
        """The checkpoint as a JSON object (what the API lists)."""
        return {
            "name": self.name,
            "serial": self.serial,
            "epoch": self.epoch,
            "step": self.step,
            "reason": self.reason,
            "metrics": dict(self.metrics),
            "monitor": self.monitor,
            "monitor_value": self.monitor_value,
            "bytes": self.bytes,
            "created_at": self.created_at,
            "torch_version": self.torch_version,
            "format_version": self.format_version,
        }

    @classmethod
    def from_manifest(cls, path: Path, manifest: Mapping[str, Any]) -> CheckpointInfo:
        files = manifest["files"]
        return cls(
            name=path.name,
            path=path,
            serial=int(manifest["serial"]),
            epoch=int(manifest["epoch"]),
            step=int(manifest["step"]),
            reason=str(manifest.get("reason", "")),
            metrics={str(k): float(v) for k, v in dict(manifest.get("metrics", {})).items()},
            monitor=manifest.get("monitor"),
            monitor_value=_finite_or_none(manifest.get("monitor_value")),
            bytes=sum(int(f["size"]) for f in files.values()),
            created_at=float(manifest["created_at"]),
            torch_version=str(manifest["torch_version"]),
            format_version=int(manifest["format_version"]),
            files=files,
        )


def _finite_or_none(value: Any) -> float | None:
    if isinstance(value, int | float) and math.isfinite(value):
        return float(value)
    return None


def is_better(value: float, reference: float | None, mode: Mode) -> bool:
    """True when ``value`` beats ``reference`` (None: anything finite beats it)."""
    if not math.isfinite(value):
        return False
    if reference is None:
        return True
    return value < reference if mode == "min" else value > reference


def checkpoints_dir(job_dir: Path) -> Path:
    """The folder that holds a job's checkpoints."""
    return Path(job_dir) / "checkpoints"


# -- writing ----------------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _HashingWriter(io.RawIOBase):
    """A binary file that hashes and counts what goes through it (one pass over the data)."""

    def __init__(self, file: io.BufferedWriter) -> None:
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha256.update(view)
        self.file.write(view)
        self.size += view.nbytes
        return view.nbytes


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "wb") as file:
        file.write(json.dumps(payload, indent=2, sort_keys=True).encode())
        file.flush()
        os.fsync(file.fileno())


def _unique_name(directory: Path, base: str) -> str:
    name, suffix = base, 1
    while (directory / name).exists():
        suffix += 1
        name = f"{base}-{suffix}"
    return name


def _next_serial(directory: Path) -> int:
    serials = [info.serial for info in list_checkpoints(directory.parent)]
    return max(serials, default=0) + 1


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
) -> CheckpointInfo:
    """Write ``state`` durably as a new checkpoint of the job and return its description.

    The name defaults to ``epoch-<epoch>-step-<step>``; a suffix keeps it unique. Pointers
    and retention are left to the caller (:func:`write_pointer`, :func:`apply_retention`).
    """
    directory = checkpoints_dir(job_dir)
    directory.mkdir(parents=True, exist_ok=True)
    name = _unique_name(directory, name or f"epoch-{epoch:04d}-step-{step:08d}")
    temp = directory / f"{TEMP_PREFIX}{name}-{secrets.token_hex(4)}"
    temp.mkdir()
    clean_metrics = {
        str(k): float(v) for k, v in (metrics or {}).items() if isinstance(v, int | float)
    }
    with open(temp / STATE_FILE, "wb") as raw:
        hashing = _HashingWriter(raw)
        with io.BufferedWriter(hashing, buffer_size=1 << 20) as buffered:
            torch.save(state, buffered)
        raw.flush()
        os.fsync(raw.fileno())
    manifest = {
        "format_version": FORMAT_VERSION,
        "serial": _next_serial(directory),
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
    _write_json(temp / MANIFEST_FILE, manifest)
    _fsync_dir(temp)
    final = directory / name
    os.rename(temp, final)
    _fsync_dir(directory)
    return CheckpointInfo.from_manifest(final, manifest)


def write_pointer(job_dir: Path, which: Literal["latest", "best"], info: CheckpointInfo) -> None:
    """Point ``latest`` or ``best`` at ``info`` atomically (temporary file, fsync, replace)."""
    directory = checkpoints_dir(job_dir)
    target = directory / _ALIASES[which]
    temp = directory / f"{TEMP_PREFIX}{which}-{secrets.token_hex(4)}.json"
    _write_json(temp, {"name": info.name, "serial": info.serial, "step": info.step})
    os.replace(temp, target)
    _fsync_dir(directory)


def read_pointer(job_dir: Path, which: Literal["latest", "best"]) -> str | None:
    """The checkpoint name a pointer holds (None when absent or unreadable)."""
    try:
        raw = json.loads((checkpoints_dir(job_dir) / _ALIASES[which]).read_bytes())
        name = raw["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and _plain_name(name) else None


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


# -- reading ----------------------------------------------------------------------------------


def _read_manifest(path: Path) -> CheckpointInfo:
    try:
        manifest = json.loads((path / MANIFEST_FILE).read_bytes())
        return CheckpointInfo.from_manifest(path, manifest)
    except FileNotFoundError:
        raise CheckpointCorrupt(f"checkpoint {path.name!r} has no manifest") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointCorrupt(f"checkpoint {path.name!r} has a bad manifest: {error}") from None


def list_checkpoints(job_dir: Path) -> list[CheckpointInfo]:
    """The job's complete checkpoints (those with a readable manifest), newest first.

    Hashes are not checked here (see :func:`verify_checkpoint`).
    """
    directory = checkpoints_dir(job_dir)
    if not directory.is_dir():
        return []
    infos = []
    for path in directory.iterdir():
        if not _plain_name(path.name) or not path.is_dir():
            continue
        with contextlib.suppress(CheckpointCorrupt):
            infos.append(_read_manifest(path))
    return sorted(infos, key=lambda info: info.serial, reverse=True)


def checkpoint_path(job_dir: Path, name: str) -> Path:
    """The folder of checkpoint ``name`` (``latest``/``last`` and ``best`` are resolved).

    :raises CheckpointNotFound: if there is no such checkpoint.
    """
    resolved: str | None = name
    if name in _ALIASES:
        which: Literal["latest", "best"] = "best" if name == "best" else "latest"
        resolved = read_pointer(job_dir, which)
    if resolved is None or not _plain_name(resolved):
        raise CheckpointNotFound(f"no checkpoint named {name!r}")
    path = checkpoints_dir(job_dir) / resolved
    if not (path / MANIFEST_FILE).is_file():
        raise CheckpointNotFound(f"no checkpoint named {name!r}")
    return path


def _read_verified(path: Path) -> tuple[CheckpointInfo, bytes]:
    info = _read_manifest(path)
    if info.format_version > FORMAT_VERSION:
        raise CheckpointCorrupt(
            f"checkpoint {info.name!r} has format {info.format_version}, newer than "
            f"{FORMAT_VERSION}"
        )
    if STATE_FILE not in info.files:
        raise CheckpointCorrupt(f"checkpoint {info.name!r} lists no {STATE_FILE}")
    contents = b""
    for file_name, expected in info.files.items():
        if not _plain_name(file_name):
            raise CheckpointCorrupt(f"checkpoint {info.name!r} lists a bad file {file_name!r}")
        try:
            data = (path / file_name).read_bytes()
        except OSError as error:
            raise CheckpointCorrupt(f"checkpoint {info.name!r}: {error}") from None
        if len(data) != int(expected["size"]) or (
            hashlib.sha256(data).hexdigest() != expected["sha256"]
        ):
            raise CheckpointCorrupt(
                f"checkpoint {info.name!r}: {file_name} does not match its manifest"
            )
        if file_name == STATE_FILE:
            contents = data
    return info, contents


def verify_checkpoint(job_dir: Path, name: str) -> CheckpointInfo:
    """Check a checkpoint's files against its manifest (sizes and sha256).

    :raises CheckpointNotFound: if there is no such checkpoint.
    :raises CheckpointCorrupt: if a file is missing or differs.
    """
    return _read_verified(checkpoint_path(job_dir, name))[0]


def _safe_load(info: CheckpointInfo, contents: bytes) -> dict[str, Any]:
    try:
        state = torch.load(io.BytesIO(contents), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # weights_only refuses globals it does not allow before anything runs; never retry
        # with weights_only=False.
        raise UnsafeCheckpoint(
            f"checkpoint {info.name!r} needs unsafe unpickling; refused: {error}"
        ) from None
    except Exception as error:
        raise CheckpointCorrupt(f"checkpoint {info.name!r} cannot be read: {error}") from None
    if not isinstance(state, dict):
        raise CheckpointCorrupt(f"checkpoint {info.name!r} does not hold a dict")
    return state


def load_checkpoint(job_dir: Path, name: str | None = None) -> dict[str, Any]:
    """Load a checkpoint's state after verifying it; ``torch.load(..., weights_only=True)``.

    With ``name`` (a checkpoint name, or ``latest``/``last``/``best``) that checkpoint is
    loaded or an error raised. Without, the one ``latest.json`` points at is tried first, then
    every other from newest to oldest; the first that verifies and loads safely is returned.

    :raises CheckpointNotFound: if the named checkpoint does not exist, or none is valid.
    :raises CheckpointCorrupt: if the named checkpoint does not match its manifest.
    :raises UnsafeCheckpoint: if the named checkpoint would need unsafe unpickling.
    """
    if name is not None:
        info, contents = _read_verified(checkpoint_path(job_dir, name))
        return _safe_load(info, contents)
    for path in _candidates(job_dir):
        try:
            info, contents = _read_verified(path)
            return _safe_load(info, contents)
        except (CheckpointCorrupt, UnsafeCheckpoint) as error:
            logger.warning("skipping checkpoint: %s", error)
    raise CheckpointNotFound(f"no valid checkpoint in {checkpoints_dir(job_dir)}")


def _candidates(job_dir: Path) -> list[Path]:
    paths = [info.path for info in list_checkpoints(job_dir)]
    pointed = read_pointer(job_dir, "latest")
    if pointed is not None:
        target = checkpoints_dir(job_dir) / pointed
        if target in paths:
            paths.remove(target)
            paths.insert(0, target)
    return paths


def latest_valid_state(job_id: str, job_dir: Path) -> dict[str, Any] | None:
    """The newest valid checkpoint's state of ``job_id`` (None when it has none).

    Matches the job manager's ``checkpoint_loader(job_id)`` once ``job_dir`` is bound, e.g.
    ``lambda job_id: latest_valid_state(job_id, data_dir / "jobs" / job_id)``.
    """
    try:
        return load_checkpoint(job_dir)
    except CheckpointNotFound:
        logger.info("job %s has no valid checkpoint in %s", job_id, job_dir)
        return None


# -- retention and clean-up -------------------------------------------------------------------


def apply_retention(
    job_dir: Path,
    *,
    keep_last: int,
    keep_best: int,
    mode: Mode,
    protect: Iterable[str] = (),
) -> list[str]:
    """Delete checkpoints beyond the ``keep_last`` newest and the ``keep_best`` best.

    The newest checkpoint, the ones the pointers name, and ``protect`` are always kept.
    Returns the deleted names.
    """
    infos = list_checkpoints(job_dir)
    keep = {info.name for info in infos[: max(keep_last, 1)]}
    sign = 1.0 if mode == "min" else -1.0
    scored = [
        (sign * info.monitor_value, info.name) for info in infos if info.monitor_value is not None
    ]
    scored.sort()
    keep.update(name for _, name in scored[: max(keep_best, 0)])
    keep.update(protect)
    for pointed in (read_pointer(job_dir, "latest"), read_pointer(job_dir, "best")):
        if pointed is not None:
            keep.add(pointed)
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
                path.unlink(missing_ok=True)
            removed.append(path.name)
    if removed:
        _fsync_dir(directory)
    return removed
