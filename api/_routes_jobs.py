"""REST routes for jobs: submit, list, inspect, control, delete, events and checkpoints."""

from __future__ import annotations

import os
import pathlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, StreamingResponse

from trainbus.bus import JobState, event_type_for
from trainbus.sdk import finite
from trainbus.subscribers import CheckpointCorrupt, CheckpointNotFound
from trainbus.worker import (
    PROGRAM_LOG_FILE_NAME,
    DatasetError,
    JobRequest,
    JobSpec,
    resolve_dataset_file,
)

from ._errors import NotFound, ServiceUnavailable
from ._schemas import (
    INVALID,
    JOB_ID_PATTERN,
    NAME_PATTERN,
    UNAUTHORIZED,
    UNAVAILABLE,
    CheckpointInfo,
    CommandAccepted,
    ErrorBody,
    EventBody,
    JobList,
    JobRecord,
    LearningRate,
)
from ._services import has_events, services_of
from ._websocket import close_job_streams

__all__ = ["SPEC_EXAMPLE", "router"]

PROGRAM_EXAMPLE: dict[str, Any] = {
    "name": "digits-loop",
    "program": {"name": "digits_loop", "params": {"epochs": 3}},
    "stall_timeout_seconds": 120,
}

SPEC_EXAMPLE: dict[str, Any] = {
    "name": "digits-mlp",
    "model": {"name": "mlp", "params": {"hidden_sizes": [64]}},
    "dataset": {"name": "digits"},
    "optimizer": {"name": "adam", "lr": 0.001},
    "epochs": 3,
    "batch_size": 32,
    "seed": 0,
}

JobId = Annotated[
    str,
    Path(pattern=JOB_ID_PATTERN, description="The job's id", examples=["j-3f2a9c1d"]),
]

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No job with this id"}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "The job's state does not allow it"}
}

router = APIRouter(responses={**UNAUTHORIZED, **INVALID}, tags=["jobs"])


@router.post(
    "/jobs",
    status_code=201,
    response_model=JobRecord,
    responses={
        200: {"model": JobRecord, "description": "This Idempotency-Key's job, made before"},
        409: {
            "model": ErrorBody,
            "description": "This Idempotency-Key was used for a job with another spec",
        },
        **UNAVAILABLE,
    },
    summary="Submit a job",
)
async def submit_job(
    request: Request,
    response: Response,
    spec: Annotated[JobRequest, Body(examples=[SPEC_EXAMPLE, PROGRAM_EXAMPLE])],
    idempotency_key: Annotated[
        str | None,
        Header(
            alias="Idempotency-Key",
            max_length=200,
            description="A key the client chooses: a retried submit with the same key returns "
            "the job the first one created (200) instead of creating a second one.",
        ),
    ] = None,
) -> dict[str, Any]:
    """Validate the job spec and queue the job; it starts when a slot is free.

    A spec with ``program`` runs a training program the server's operator registered
    (``GET /registry`` lists them with their parameters) instead of the built-in trainer."""
    services = services_of(request)
    if not services.accepting:
        raise ServiceUnavailable("the server is shutting down and accepts no new jobs")
    if isinstance(spec, JobSpec):
        await _check_dataset_file(spec, services.settings.data_dir)
    record, created = await services.jobs.submit(spec, idempotency_key)
    response.headers["Location"] = f"/jobs/{record['id']}"
    if not created:
        response.status_code = 200
    return record


async def _check_dataset_file(spec: JobSpec, data_dir: pathlib.Path) -> None:
    """A CSV dataset's file must be there when the job is submitted, not only when it runs.

    :raises RequestValidationError: naming ``dataset.params.file`` (422).
    """
    file = spec.dataset.params.get("file") if spec.dataset.name == "csv" else None
    if not isinstance(file, str):
        return
    try:
        await anyio.to_thread.run_sync(resolve_dataset_file, data_dir, file)
    except DatasetError as error:
        raise RequestValidationError(
            [
                {
                    "type": "value_error",
                    "loc": ("body", "dataset", "params", "file"),
                    "msg": str(error),
                    "input": file,
                }
            ]
        ) from None


@router.get("/jobs", response_model=JobList, summary="List jobs")
async def list_jobs(
    request: Request,
    state: Annotated[
        JobState | None,
        Query(description="Only jobs in this state"),
    ] = None,
    offset: Annotated[int, Query(ge=0, le=1_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> dict[str, Any]:
    """Jobs in the order they were submitted (oldest first), one page at a time."""
    items, total = await services_of(request).jobs.list_jobs(
        state=state, offset=offset, limit=limit
    )
    return {"items": items, "total": total, "offset": offset, "limit": limit}


@router.get("/jobs/{job_id}", response_model=JobRecord, responses=_NOT_FOUND, summary="Get a job")
async def get_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """The job's record: state, epoch, step, latest metrics, stop reason and error."""
    return await services_of(request).jobs.get(job_id)


async def _command(
    request: Request, job_id: str, kind: str, value: float | None = None
) -> dict[str, Any]:
    return await services_of(request).jobs.command(job_id, kind, value)


_COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {**_NOT_FOUND, **_CONFLICT, **UNAVAILABLE}


@router.post(
    "/jobs/{job_id}/pause",
    status_code=202,
    response_model=CommandAccepted,
    responses=_COMMAND_RESPONSES,
    summary="Pause a running job",
)
async def pause_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Ask the trainer to checkpoint and hold at the next batch boundary.

    A paused job keeps its running slot (``TRAINBUS_MAX_RUNNING_JOBS``): queued jobs wait
    until it is resumed or stopped."""
    return await _command(request, job_id, "pause")


@router.post(
    "/jobs/{job_id}/resume",
    status_code=202,
    response_model=CommandAccepted,
    responses=_COMMAND_RESPONSES,
    summary="Resume a paused, stopped or interrupted job",
)
async def resume_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Continue a paused job, or restart a stopped or interrupted one from its checkpoint."""
    return await _command(request, job_id, "resume")


@router.post(
    "/jobs/{job_id}/stop",
    status_code=202,
    response_model=CommandAccepted,
    responses=_COMMAND_RESPONSES,
    summary="Stop a job",
)
async def stop_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Ask the trainer to finish the current batch, checkpoint and end the job (``stopped``)."""
    return await _command(request, job_id, "stop")


@router.post(
    "/jobs/{job_id}/save",
    status_code=202,
    response_model=CommandAccepted,
    responses=_COMMAND_RESPONSES,
    summary="Checkpoint a running or paused job",
)
async def save_job(request: Request, job_id: JobId) -> dict[str, Any]:
    """Ask the trainer for a checkpoint at the next batch boundary; ``checkpoint_saved``
    carries the command's id and the step it was taken at."""
    return await _command(request, job_id, "save")


@router.post(
    "/jobs/{job_id}/set_lr",
    status_code=202,
    response_model=CommandAccepted,
    responses=_COMMAND_RESPONSES,
    summary="Set a running or paused job's learning rate",
)
async def set_job_lr(request: Request, job_id: JobId, body: LearningRate) -> dict[str, Any]:
    """Set every parameter group's learning rate at the next batch boundary (a schedule
    continues relative to it); ``command_applied`` names the step it took effect at."""
    return await _command(request, job_id, "set_lr", body.value)


@router.delete(
    "/jobs/{job_id}",
    status_code=204,
    response_class=Response,
    responses={**_NOT_FOUND, **_CONFLICT},
    summary="Delete an ended job",
)
async def delete_job(request: Request, job_id: JobId) -> Response:
    """Remove an ended job's record, stored events and files; its live event streams close
    with code 4404."""
    services = services_of(request)
    await services.jobs.delete(job_id)
    close_job_streams(services, job_id)
    return Response(status_code=204)


@router.get(
    "/jobs/{job_id}/events",
    response_model=list[EventBody],
    responses=_NOT_FOUND,
    summary="Stored events of a job",
)
async def job_events(
    request: Request,
    job_id: JobId,
    after_seq: Annotated[int, Query(ge=0, le=2**62, description="Only events after this seq")] = 0,
    types: Annotated[
        str | None,
        Query(
            max_length=2000,
            description="Comma-separated event types (or callback names) to keep",
            examples=["fit_epoch_end,job_completed"],
        ),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict[str, Any]]:
    """The job's stored events, in ``seq`` order."""
    services = services_of(request)
    selected = (
        None
        if types is None or not types.strip()
        else frozenset(event_type_for(name.strip()) for name in types.split(",") if name.strip())
    )
    if not await has_events(services, job_id):
        await services.jobs.get(job_id)  # raises the job-not-found error
    if services.history is None:
        raise ServiceUnavailable("the event store is not running")
    # The store writes a little behind the live stream: wait (bounded) until it holds what the
    # job had published when the request came, so that a state its record already shows (a
    # pause, a stop) is in the answer too.
    await services.history.wait_for(job_id, services.bus.last_seq(job_id))
    events = await services.history.read(job_id, after_seq=after_seq, types=selected, limit=limit)
    return [finite(event.to_dict()) for event in events]


@router.get(
    "/jobs/{job_id}/log",
    response_class=FileResponse,
    responses={
        200: {"content": {"text/plain": {}}, "description": "The program's output"},
        **_NOT_FOUND,
    },
    summary="Download a program job's log",
)
async def download_log(request: Request, job_id: JobId) -> Response:
    """Everything a registered program wrote to its stdout and stderr, line by line (the
    ``log`` events carry the same lines, rate-limited)."""
    services = services_of(request)
    record = await services.jobs.get(job_id)  # raises the job-not-found error
    path = services.settings.data_dir / "jobs" / job_id / PROGRAM_LOG_FILE_NAME
    if not await anyio.to_thread.run_sync(path.is_file):
        if "program" not in record.get("spec", {}):
            raise NotFound(
                f"job {job_id!r} runs the built-in trainer, which keeps no log file: its "
                f"events are at GET /jobs/{job_id}/events"
            )
        raise NotFound(f"job {job_id!r} has no log yet: its program has not started")
    file = await anyio.to_thread.run_sync(open, path, "rb")
    size = os.fstat(file.fileno()).st_size  # a running program's log grows: send what is there

    async def chunks() -> AsyncIterator[bytes]:
        left = size
        try:
            while left > 0 and (
                chunk := await anyio.to_thread.run_sync(file.read, min(left, 1 << 20))
            ):
                left -= len(chunk)
                yield chunk
        finally:
            file.close()

    disposition = f'attachment; filename="{job_id}-{PROGRAM_LOG_FILE_NAME}"'
    return StreamingResponse(
        chunks(),
        media_type="text/plain; charset=utf-8",
        headers={"content-length": str(size), "content-disposition": disposition},
    )


@router.get(
    "/jobs/{job_id}/checkpoints",
    response_model=list[CheckpointInfo],
    responses=_NOT_FOUND,
    summary="List a job's checkpoints",
)
async def list_checkpoints(request: Request, job_id: JobId) -> list[dict[str, Any]]:
    """The job's checkpoints, newest first; ``latest`` and ``best`` mark the ones those
    names download."""
    return await services_of(request).jobs.checkpoints(job_id)


@router.get(
    "/jobs/{job_id}/checkpoints/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The state file"},
        **_NOT_FOUND,
    },
    summary="Download a checkpoint",
)
async def download_checkpoint(
    request: Request,
    job_id: JobId,
    name: Annotated[
        str,
        Path(
            pattern=NAME_PATTERN,
            description="A name from the listing, or 'latest' or 'best'",
            examples=["best"],
        ),
    ],
) -> Response:
    """The checkpoint's state file (load it with ``torch.load(..., weights_only=True)``)."""
    gone = NotFound(
        f"checkpoint {name!r} of job {job_id!r} was deleted by the job's retention while it "
        f"was being read: list them again with GET /jobs/{job_id}/checkpoints"
    )
    jobs = services_of(request).jobs
    try:
        path = await jobs.checkpoint_file(job_id, name)
        # Open before answering: retention may delete the checkpoint at any moment, and an open
        # file stays readable after its name is gone, so the download is whole or a 404.
        file = await anyio.to_thread.run_sync(open, path, "rb")
    except (CheckpointCorrupt, CheckpointNotFound, FileNotFoundError):
        if name not in {info["name"] for info in await jobs.checkpoints(job_id)}:
            raise gone from None
        raise CheckpointCorrupt(f"checkpoint {name!r} of job {job_id!r} cannot be read") from None
    size = os.fstat(file.fileno()).st_size

    async def chunks() -> AsyncIterator[bytes]:
        try:
            while chunk := await anyio.to_thread.run_sync(file.read, 1 << 20):
                yield chunk
        finally:
            file.close()

    disposition = f'attachment; filename="{job_id}-{name}.pt"'
    return StreamingResponse(
        chunks(),
        media_type="application/octet-stream",
        headers={"content-length": str(size), "content-disposition": disposition},
    )
