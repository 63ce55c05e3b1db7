"""A plugin of models that misbehave after a few training steps, for the supervision tests:
one crashes its process with a segmentation fault, one allocates memory until it has none,
one hangs in a Python loop for a while. :func:`install` makes it an installed distribution
(its entry points in a ``.dist-info`` folder) that a server started with that folder on its
``PYTHONPATH`` loads, as it loads any plugin, in its own process and in its workers."""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainbus.worker import ModelEntry

__all__ = ["HANGING", "MEMORY_HUNGRY", "SEGFAULTING", "install"]


class FaultParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after_steps: int = Field(default=5, ge=0)
    """Training steps that run normally before the fault."""
    mib_per_step: int = Field(default=64, ge=1)
    """``memory_hungry``: what each faulty step allocates and keeps."""
    hang_seconds: float = Field(default=3.0, ge=0)
    """``hanging``: how long the faulty step hangs."""
    only_rank: int | None = Field(default=None, ge=0)
    """``hanging``, in a distributed job: the one rank that hangs."""


class _Faulty(nn.Module):
    def __init__(self, params: FaultParams, in_features: int, out_features: int) -> None:
        super().__init__()
        self.params = params
        self.layer = nn.Linear(in_features, out_features)
        self.steps = 0
        self.kept: list[torch.Tensor] = []

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.steps > self.params.after_steps:
                self.fault()
        return self.layer(inputs)  # type: ignore[no-any-return]

    def fault(self) -> None:
        raise NotImplementedError


class _Segfaulting(_Faulty):
    def fault(self) -> None:
        ctypes.string_at(0)  # reads address 0: SIGSEGV


class _MemoryHungry(_Faulty):
    def fault(self) -> None:
        # address space, not pages: the limit counts what is mapped, the machine is spared
        self.kept.append(torch.empty(self.params.mib_per_step * 2**18))  # 4 bytes each


class _Hanging(_Faulty):
    def fault(self) -> None:
        rank = self.params.only_rank
        if rank is not None and os.environ.get("RANK") != str(rank):
            return
        if self.steps == self.params.after_steps + 1:
            spin_in_python_code(self.params.hang_seconds)


def spin_in_python_code(seconds: float) -> None:
    """Hang in Python code, as a loop waiting on something that does not come would."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        time.sleep(0.01)


SEGFAULTING = ModelEntry(
    "segfaulting", FaultParams, lambda p, i, o: _Segfaulting(p, i, o), "Crashes (SIGSEGV)."
)
MEMORY_HUNGRY = ModelEntry(
    "memory_hungry", FaultParams, lambda p, i, o: _MemoryHungry(p, i, o), "Allocates, keeps."
)
HANGING = ModelEntry("hanging", FaultParams, lambda p, i, o: _Hanging(p, i, o), "Hangs once.")


def install(site: Path) -> Path:
    """Declare this module's entries in a distribution's metadata under ``site`` (which goes
    on the server's ``PYTHONPATH``, with the repository's root for the module itself)."""
    info = site / "trainbus_faulty_models-0.1.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trainbus-faulty-models\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[trainbus.models]\n"
        + "".join(
            f"{name} = {__name__}:{name.upper()}\n"
            for name in ("segfaulting", "memory_hungry", "hanging")
        )
    )
    return site
