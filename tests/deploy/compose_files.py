"""Reading docker-compose.yml as Docker Compose would, without Docker: interpolation of
``${VARIABLE}`` forms and the mapping of container paths back to files of the repository."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

_REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: str, environment: Mapping[str, str]) -> str:
    """``value`` with ``${NAME}``, ``${NAME:-default}`` and ``${NAME:?error}`` filled in.

    :raises KeyError: for a required variable missing from ``environment``.
    """

    def replace(match: re.Match[str]) -> str:
        name, operator, argument = match.group(1), match.group(2), match.group(3)
        present = environment.get(name)
        if operator in (":-", "-"):
            return present if present else argument
        if operator in (":?", "?") and not present:
            raise KeyError(f"{name}: {argument}")
        return present or ""

    return _REFERENCE.sub(replace, value)


def referenced_variables(text: str) -> set[str]:
    """Names of the variables a compose file interpolates."""
    return {match.group(1) for match in _REFERENCE.finditer(text)}


def bind_mounts(service: Mapping[str, Any], root: Path) -> dict[PurePosixPath, Path]:
    """Container path -> repository path for the service's bind mounts (short syntax)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[PurePosixPath(target)] = (root / source).resolve()
    return mounts


def named_volumes(service: Mapping[str, Any]) -> dict[PurePosixPath, str]:
    """Container path -> volume name for the service's named volumes."""
    volumes = {}
    for volume in service.get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if not source.startswith((".", "/")):
            volumes[PurePosixPath(target)] = source
    return volumes


def host_path(mounts: Mapping[PurePosixPath, Path], container_path: str) -> Path | None:
    """Where ``container_path`` comes from on the host, through the deepest bind mount."""
    path = PurePosixPath(container_path)
    for target in sorted(mounts, key=lambda item: len(item.parts), reverse=True):
        if path == target or target in path.parents:
            return mounts[target].joinpath(*path.parts[len(target.parts) :])
    return None
