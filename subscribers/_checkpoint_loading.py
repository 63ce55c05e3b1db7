"""Verifying and loading checkpoints: hashes first, then ``torch.load(weights_only=True)``."""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from pathlib import Path
from typing import Any

import torch

from ._checkpoint_files import write_pointer
from ._checkpoint_layout import (
    FORMAT_VERSION,
    STATE_FILE,
    CheckpointInfo,
    checkpoint_path,
    checkpoints_dir,
    list_checkpoints,
    plain_name,
    read_manifest,
    read_pointer,
    refuse_links,
)
from ._errors import CheckpointCorrupt, CheckpointNotFound, UnsafeCheckpoint

__all__ = ["adopt_newest_checkpoint", "latest_valid_state", "load_checkpoint", "verify_checkpoint"]

logger = logging.getLogger(__name__)


def _read_verified(path: Path) -> tuple[CheckpointInfo, bytes]:
    info = read_manifest(path)
    if info.format_version > FORMAT_VERSION:
        raise CheckpointCorrupt(
            f"checkpoint {info.name!r} has format {info.format_version}, newer than "
            f"{FORMAT_VERSION}"
        )
    if STATE_FILE not in info.files:
        raise CheckpointCorrupt(f"checkpoint {info.name!r} lists no {STATE_FILE}")
    contents = b""
    for file_name, expected in info.files.items():
        if not plain_name(file_name):
            raise CheckpointCorrupt(f"checkpoint {info.name!r} lists a bad file {file_name!r}")
        refuse_links(path / file_name)
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


def adopt_newest_checkpoint(job_dir: Path) -> str | None:
    """Point ``latest`` at the job's newest checkpoint that verifies, when it names an older
    one or none; the name ``latest`` then names (None: the job has no valid checkpoint).

    A process killed between renaming a finished checkpoint into place and moving the pointer
    leaves a complete checkpoint that ``latest`` does not name; call this at recovery, before
    any writer of the job runs, so that the pointer, the job's record and its resume agree.
    Costs one listing and one pointer read when they already agree.
    """
    pointed = read_pointer(job_dir, "latest")
    for info in list_checkpoints(job_dir):  # newest first
        if info.name == pointed:
            return pointed
        try:
            verify_checkpoint(job_dir, info.name)
        except CheckpointCorrupt as error:
            logger.warning("skipping checkpoint: %s", error)
            continue
        write_pointer(job_dir, "latest", info)
        logger.info("checkpoint %s is the newest complete one: latest now names it", info.name)
        return info.name
    return pointed


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
