"""What subscribers need of a trainer (duck typing: ``subscribers`` never imports ``worker``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol

import torch

from trainbus.bus import ControlChannel, Stateful

__all__ = ["TrainerLike"]


class TrainerLike(Protocol):
    """The trainer as seen from inline callbacks on the training thread (ARCHITECTURE.md)."""

    @property
    def job_id(self) -> str: ...

    @property
    def epoch(self) -> int: ...

    @property
    def step(self) -> int: ...

    @property
    def metrics(self) -> Mapping[str, float]: ...

    @property
    def model(self) -> torch.nn.Module: ...

    @property
    def control(self) -> ControlChannel: ...

    @property
    def save_reason(self) -> str | None: ...

    weights_origin: dict[str, Any] | None
    """Whose weights the model holds when they are not the last trained ones (None)."""

    def flush_events(self) -> None: ...

    def add_callback(self, name: str, fn: Callable[[Any], object]) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def register_stateful(self, name: str, obj: Stateful) -> None: ...
