"""The per-job subscribers of a run: its checkpoint writer and controllers, and, in a worker
process, its trackers.

A module of its own, light to import (no FastAPI): a worker process gets
:func:`worker_subscribers` by reference, so its fork server imports this module before any
worker starts.
"""

from __future__ import annotations

from trainbus.bus import ControlChannel, EventBus, Subscriber
from trainbus.subscribers import CheckpointWriter, EarlyStopController, LRPlateauController
from trainbus.worker import JobHandle, JobSpec, ProgramSpec, RunSpec

from ._settings import Settings
from ._tracking import tracker_subscribers

__all__ = ["job_subscribers", "run_subscribers", "worker_subscribers"]


def job_subscribers(handle: JobHandle, bus: EventBus) -> list[Subscriber]:
    """The per-job subscribers a spec asks for, bound to the job's trainer."""
    spec = handle.spec
    trainer = handle.trainer
    if trainer is None:  # the manager builds the trainer before it asks for subscribers
        raise RuntimeError(f"job {handle.id} has no trainer yet")
    built: list[Subscriber] = []
    if spec.checkpoint.enabled:
        writer = CheckpointWriter(
            job_id=handle.id,
            job_dir=handle.job_dir,
            bus=bus,
            **spec.checkpoint.model_dump(exclude={"enabled"}),
        )
        writer.bind(trainer)
        built.append(writer)
    for controller in _controllers(handle.id, spec, handle.control, bus, restore_best=True):
        controller.bind(trainer)
        built.append(controller)
    return built


def run_subscribers(
    job_id: str, spec: RunSpec | ProgramSpec, control: ControlChannel, *, bus: EventBus
) -> list[Subscriber]:
    """The server-side subscribers of an SDK run or a registered program: its controllers
    (the training code is the user's or the operator's; they decide on the server, and the
    run waits for them at each epoch's end)."""
    return list(_controllers(job_id, spec, control, bus, restore_best=False))


def _controllers(
    job_id: str,
    spec: JobSpec | RunSpec | ProgramSpec,
    control: ControlChannel,
    bus: EventBus,
    *,
    restore_best: bool,
) -> list[EarlyStopController | LRPlateauController]:
    """The early-stop and LR-plateau controllers ``spec`` turns on (``restore_best`` needs
    the trainer's weights, which only a built-in job has here)."""
    built: list[EarlyStopController | LRPlateauController] = []
    if spec.early_stop.enabled:
        excluded = {"enabled"} if restore_best else {"enabled", "restore_best"}
        built.append(
            EarlyStopController(
                job_id=job_id,
                channel=control,
                bus=bus,
                **spec.early_stop.model_dump(exclude=excluded),
            )
        )
    if spec.lr_plateau.enabled:
        built.append(
            LRPlateauController(
                job_id=job_id,
                channel=control,
                bus=bus,
                **spec.lr_plateau.model_dump(exclude={"enabled"}),
            )
        )
    return built


def worker_subscribers(handle: JobHandle, bus: EventBus, *, settings: Settings) -> list[Subscriber]:
    """The trainer-side subscribers of a run in a worker process: checkpoints, controllers,
    trackers (a module-level function: the worker process gets it by reference)."""
    return [*job_subscribers(handle, bus), *tracker_subscribers(handle, bus, settings)]
