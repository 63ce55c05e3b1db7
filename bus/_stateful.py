"""What checkpoints carry: any object with a ``state_dict`` and a ``load_state_dict``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

__all__ = ["Stateful"]


class Stateful(Protocol):
    """An object whose state travels in checkpoints (a model, an optimizer, a trainer)."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
