"""The spec of an SDK run: a job whose training runs in the user's own process, on this host
or another, and attaches to the server over the worker protocol (``trainbus.sdk``)."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trainbus.sdk import RUN_ID_PATTERN

from ._numbers import not_a_boolean
from ._spec import EarlyStopSpec, LRPlateauSpec, StallSeconds

__all__ = ["RunRequest", "RunSpec", "is_run_spec"]

MAX_CONFIG_BYTES = 64 * 1024


class RunRequest(BaseModel):
    """What an SDK process sends to create its run's job or attach to it again (the run id
    goes in the path)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    name: str | None = Field(default=None, max_length=200)
    config: dict[str, Any] = Field(
        default_factory=dict, description="The run's hyperparameters, as the user logs them."
    )
    epochs: Annotated[int, Field(ge=1, le=100_000), not_a_boolean] | None = None
    from_step: Annotated[int, Field(ge=0), not_a_boolean] | None = Field(
        default=None,
        description="This attach continues from a checkpoint at this step: the history after "
        "it is rewound (published with job_started, so that curves do not double).",
    )
    early_stop: EarlyStopSpec = Field(default_factory=EarlyStopSpec)
    lr_plateau: LRPlateauSpec = Field(default_factory=LRPlateauSpec)
    stall_timeout_seconds: StallSeconds = None
    on_stall: Literal["warn", "fail"] = "warn"

    @field_validator("config")
    @classmethod
    def _bounded(cls, config: dict[str, Any]) -> dict[str, Any]:
        try:
            size = len(json.dumps(config, allow_nan=False))
        except (TypeError, ValueError):
            message = "config must be JSON (finite numbers, strings, lists, objects)"
            raise ValueError(message) from None
        if size > MAX_CONFIG_BYTES:
            raise ValueError(f"config takes {size} bytes as JSON; at most {MAX_CONFIG_BYTES}")
        return config


class RunSpec(RunRequest):
    """An SDK run. The same ``run_id`` always names the same job: a process restarted from its
    checkpoint attaches to it again and says from which step its history continues."""

    run_id: str = Field(pattern=RUN_ID_PATTERN, description="Chosen by the client.")


def is_run_spec(spec: dict[str, Any]) -> bool:
    """Whether a stored spec is an SDK run's (else the built-in trainer's)."""
    return "run_id" in spec
