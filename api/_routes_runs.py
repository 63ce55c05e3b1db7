"""``PUT /runs/{run_id}``: an SDK run creates its job, or attaches to it again.

The run id is the client's (as W&B's ``resume``): the same id always names the same job, so a
process restarted from its checkpoint continues the job it belongs to, and a retried request
never makes a second one. The answer carries the job's record and a credential for the worker
endpoint (``/jobs/{id}/worker``), valid for this process of the run only.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Request, Response
from pydantic import BaseModel, Field

from trainbus.sdk import RUN_ID_PATTERN
from trainbus.worker import RunRequest, RunSpec

from ._errors import ServiceUnavailable
from ._schemas import INVALID, UNAUTHORIZED, UNAVAILABLE, ErrorBody, JobRecord
from ._services import services_of

__all__ = ["router"]

router = APIRouter(responses={**UNAUTHORIZED, **INVALID}, tags=["runs"])


class RunAttached(BaseModel):
    """A run's job and the credential of the process that attached."""

    job: JobRecord
    worker_token: str = Field(
        description="Opens /jobs/{id}/worker for this process; it publishes this job's "
        "events and receives its commands, nothing else. Never logged or stored in clear."
    )
    created: bool = Field(description="Whether this request created the job.")


RUN_EXAMPLE: dict[str, Any] = {
    "name": "my-resnet",
    "config": {"lr": 0.1, "batch_size": 128},
    "epochs": 10,
    "early_stop": {"enabled": True, "monitor": "val_loss", "patience": 3},
}


@router.put(
    "/runs/{run_id}",
    response_model=RunAttached,
    status_code=201,
    responses={
        200: {"model": RunAttached, "description": "Attached to the run's existing job"},
        409: {"model": ErrorBody, "description": "The run has completed"},
        **UNAVAILABLE,
    },
    summary="Create or attach to an SDK run",
)
async def attach_run(
    request: Request,
    response: Response,
    run_id: Annotated[str, Path(pattern=RUN_ID_PATTERN, description="The client's run id")],
    body: Annotated[RunRequest, Body(examples=[RUN_EXAMPLE])],
) -> dict[str, Any]:
    """Create the job of run ``run_id``, or attach to it again (``from_step``: this process
    continues from a checkpoint at that step)."""
    services = services_of(request)
    if not services.accepting:
        raise ServiceUnavailable("the server is shutting down and accepts no new runs")
    spec = RunSpec(**body.model_dump(), run_id=run_id)
    record, token, created = await services.jobs.attach_run(spec)
    response.headers["Location"] = f"/jobs/{record['id']}"
    if not created:
        response.status_code = 200
    return {"job": record, "worker_token": token, "created": created}
