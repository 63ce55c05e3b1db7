"""Request and response bodies of the REST API (what the OpenAPI document shows)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from trainbus.bus import JobState

__all__ = [
    "INVALID",
    "JOB_ID_PATTERN",
    "NAME_PATTERN",
    "UNAUTHORIZED",
    "UNAVAILABLE",
    "CheckpointInfo",
    "CommandAccepted",
    "ErrorBody",
    "EventBody",
    "Health",
    "JobFailureBody",
    "JobList",
    "JobRecord",
    "Readiness",
    "RegistryBody",
    "ValidationErrorBody",
]

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Job ids in paths: letters, digits, ``_`` and ``-`` only, so never a path."""
NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"
"""Checkpoint names in paths (looked up in the listing, never joined to a path)."""

_JOB_EXAMPLE: dict[str, Any] = {
    "id": "j-3f2a9c1d",
    "state": "running",
    "spec": {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 3},
    "created_at": 1764340000.0,
    "started_at": 1764340001.2,
    "ended_at": None,
    "name": "digits-mlp",
    "epoch": 1,
    "step": 57,
    "metrics": {"train_loss": 0.41, "val_loss": 0.38, "val_accuracy": 0.91},
    "stop_reason": None,
    "error": None,
    "checkpoint": "epoch-0001-step-00000045",
}


class ErrorBody(BaseModel):
    """Every error: what went wrong and what to fix."""

    detail: str = Field(examples=["job 'j-404' does not exist: list jobs with GET /jobs"])


class ValidationErrorBody(BaseModel):
    """A request that does not validate: FastAPI's list of errors, each naming its field, and
    a ``message``; or, for a value that is well-formed but names something the server does not
    know (an event type, a dataset file), one ``detail`` string saying what to fix."""

    detail: list[dict[str, Any]] | str = Field(
        examples=[[{"type": "missing", "loc": ["body", "dataset"], "msg": "Field required"}]]
    )
    message: str | None = Field(default=None, examples=["invalid request: fix body.dataset"])


UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing or wrong API token"}
}
"""OpenAPI ``responses`` entries shared by the routers."""
INVALID: dict[int | str, dict[str, Any]] = {
    422: {"model": ValidationErrorBody, "description": "Invalid parameters"}
}
UNAVAILABLE: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "The server is shutting down"}
}


class JobFailureBody(BaseModel):
    """Why a job failed; for a worker process that died, how it ended and its last log lines."""

    type: str
    message: str
    exitcode: int | None = Field(
        default=None, description="The worker's exit code (minus the signal that ended it)."
    )
    stderr_tail: str | None = Field(default=None, description="The worker's last log lines.")
    fatal_error: str | None = Field(
        default=None,
        description="For a worker that crashed in native code (a segmentation fault): "
        "faulthandler's report, the crashed thread's Python stack, innermost call first.",
    )
    memory_limit_bytes: int | None = Field(
        default=None, description="For a job that exceeded its memory limit: that limit."
    )


class Rendezvous(BaseModel):
    """Where the agents of a job's other hosts join its current run."""

    endpoint: str = Field(
        description="host:port of the run's rendezvous store", examples=["10.0.0.5:41873"]
    )
    run: str = Field(description="the run's key: each run of the job has its own")


class JobRecord(BaseModel):
    """A job: its spec, state and progress (non-finite metrics are ``null``)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [_JOB_EXAMPLE]})

    id: str
    name: str | None = None
    state: JobState
    spec: dict[str, Any]
    created_at: float
    started_at: float | None = None
    ended_at: float | None = None
    epoch: int = Field(0, description="Epochs completed")
    step: int = Field(0, description="Optimizer steps done")
    metrics: dict[str, float | None] = Field(default_factory=dict, description="Latest metrics")
    stop_reason: str | None = None
    error: JobFailureBody | None = None
    checkpoint: str | None = Field(None, description="The latest checkpoint's name")
    waiting_for: str | None = Field(
        None,
        description="For a queued job, what it waits for (a running slot, and which jobs hold "
        "them; a paused job keeps its slot)",
    )
    devices: list[str] | None = Field(
        None,
        description="For a running or paused job, the device slots it holds (cuda:0, cpu:1); "
        "its worker sees only the CUDA devices among them",
        examples=[["cuda:0"]],
    )
    rendezvous: Rendezvous | None = Field(
        None,
        description="For a running job on several hosts (distributed.nnodes > 1), where "
        "`trainbus agent` on each other host joins its current run",
    )


class JobList(BaseModel):
    """One page of jobs, newest first."""

    items: list[JobRecord]
    total: int = Field(description="jobs matching the filter, on every page")
    offset: int
    limit: int


class CommandAccepted(BaseModel):
    """A control command queued for the trainer; its effect shows up as an event."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"command_id": "9c1d3f2a5b6e7f80", "job_id": "j-3f2a9c1d", "command": "pause"}
            ]
        }
    )

    command_id: str
    job_id: str
    command: Literal["pause", "resume", "stop", "save", "set_lr"]


class LearningRate(BaseModel):
    """The learning rate a ``set_lr`` command sets on every parameter group."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"value": 0.01}]})

    value: float = Field(gt=0.0, le=10.0, allow_inf_nan=False, description="New learning rate.")


class EventBody(BaseModel):
    """One event: per job, ``seq`` runs from 1 without gaps."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "job_id": "j-3f2a9c1d",
                    "seq": 42,
                    "type": "fit_epoch_end",
                    "time": 1764340012.5,
                    "data": {"epoch": 0, "metrics": {"val_loss": 0.38}},
                }
            ]
        }
    )

    job_id: str
    seq: int
    type: str
    time: float
    data: dict[str, Any]


class CheckpointInfo(BaseModel):
    """A checkpoint of a job, as listed; download it by ``name``."""

    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "name": "epoch-0002-step-00000114",
                    "epoch": 1,
                    "step": 114,
                    "reason": "epoch_end",
                    "metrics": {"val_loss": 0.31},
                    "latest": True,
                    "best": True,
                }
            ]
        },
    )

    name: str = Field(description="epoch-<epoch, counted from 1>-step-<optimizer steps>")
    epoch: int | None = Field(
        None, description="The epoch it was saved in, as a 0-based index (the name counts from 1)"
    )
    latest: bool = Field(False, description="The newest checkpoint (download it as 'latest')")
    best: bool = Field(
        False, description="The best by the spec's checkpoint.monitor (download it as 'best')"
    )


class RegistryBody(BaseModel):
    """The models, datasets and programs a job spec may name, with their parameter schemas."""

    model_config = ConfigDict(extra="allow")

    models: Any
    datasets: Any
    programs: Any = None


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    """Whether the server accepts jobs now, and the state of its parts."""

    status: Literal["ready", "starting", "shutting_down"]
    checks: dict[str, Any] = Field(default_factory=dict)
