"""The checkpoint folder layout: names, manifests, pointers and listing.

See ``_checkpoint_files`` for how a checkpoint is written and ``_checkpoint_loading`` for
how one is verified and loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._errors import CheckpointCorrupt, CheckpointNotFound

__all__ = [
    "BEST_POINTER",
    "FORMAT_VERSION",
    "LATEST_POINTER",
    "MANIFEST_FILE",
    "STATE_FILE",
    "TEMP_PREFIX",
    "CheckpointInfo",
    "checkpoint_path",
    "checkpoints_dir",
    "list_checkpoints",
    "plain_name",
    "read_manifest",
    "read_pointer",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the checkpoint layout and manifest written by this code."""

STATE_FILE = "state.pt"
MANIFEST_FILE = "manifest.json"
LATEST_POINTER = "latest.json"
BEST_POINTER = "best.json"
TEMP_PREFIX = ".tmp-"
_ALIASES = {"latest": LATEST_POINTER, "last": LATEST_POINTER, "best": BEST_POINTER}


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


def checkpoints_dir(job_dir: Path) -> Path:
    """The folder that holds a job's checkpoints."""
    return Path(job_dir) / "checkpoints"


def read_pointer(job_dir: Path, which: Literal["latest", "best"]) -> str | None:
    """The checkpoint name a pointer holds (None when absent or unreadable)."""
    try:
        raw = json.loads((checkpoints_dir(job_dir) / _ALIASES[which]).read_bytes())
        name = raw["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and plain_name(name) else None


def plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def refuse_links(*paths: Path) -> None:
    """Checkpoints are never read, listed or deleted through a symbolic link: the writer never
    makes one, so a link was planted (possibly leading out of the data folder).

    :raises CheckpointCorrupt: naming the first path that is a link.
    """
    for path in paths:
        if path.is_symlink():
            raise CheckpointCorrupt(
                f"{path.name!r} is a symbolic link; checkpoints are never read through links"
            )


def read_manifest(path: Path) -> CheckpointInfo:
    refuse_links(path.parent.parent, path.parent, path, path / MANIFEST_FILE)
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
        if not plain_name(path.name) or not path.is_dir():
            continue
        with contextlib.suppress(CheckpointCorrupt):
            infos.append(read_manifest(path))
    return sorted(infos, key=lambda info: info.serial, reverse=True)


def checkpoint_path(job_dir: Path, name: str) -> Path:
    """The folder of checkpoint ``name`` (``latest``/``last`` and ``best`` are resolved).

    :raises CheckpointNotFound: if there is no such checkpoint.
    """
    resolved: str | None = name
    if name in _ALIASES:
        which: Literal["latest", "best"] = "best" if name == "best" else "latest"
        resolved = read_pointer(job_dir, which)
    if resolved is None or not plain_name(resolved):
        raise CheckpointNotFound(f"no checkpoint named {name!r}")
    path = checkpoints_dir(job_dir) / resolved
    linked = any(p.is_symlink() for p in (Path(job_dir), path.parent, path))
    if linked or not (path / MANIFEST_FILE).is_file():
        raise CheckpointNotFound(f"no checkpoint named {name!r}")
    return path
