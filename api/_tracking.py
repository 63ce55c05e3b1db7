"""Which experiment trackers a job gets: its spec's ``trackers`` section over the server's
defaults (``Settings.trackers`` and the ``tensorboard_*``/``mlflow_*``/``wandb_*`` fields)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainbus.bus import EventBus, Subscriber
from trainbus.subscribers import (
    MLflowExporter,
    TensorBoardExporter,
    WandbExporter,
    missing_tracker_package,
)
from trainbus.worker import JobHandle, JobSpec, SpecError

from ._settings import Settings

__all__ = ["check_trackers", "tracker_subscribers"]


def _sections(spec: JobSpec, settings: Settings) -> dict[str, Mapping[str, Any]]:
    """Each tracker on for this job -> its spec section's set fields (empty when on by the
    settings alone)."""
    chosen: dict[str, Mapping[str, Any]] = {name: {} for name in settings.trackers}
    for name in ("tensorboard", "mlflow", "wandb"):
        section = getattr(spec.trackers, name)
        if section is not None:
            chosen[name] = section.model_dump(exclude_none=True)
    return chosen


def check_trackers(spec: JobSpec, settings: Settings) -> None:
    """Refuse (422) a job whose trackers cannot run here.

    :raises SpecError: naming the extra to install, or the setting that is missing.
    """
    for name, section in _sections(spec, settings).items():
        extra = missing_tracker_package(name)
        if extra is not None:
            raise SpecError(
                f"trackers.{name}: the {name} package is not installed on this server; "
                f"install it with pip install '{extra}', or leave trackers.{name} out"
            )
        if name == "mlflow" and not (section.get("tracking_uri") or settings.mlflow_tracking_uri):
            raise SpecError(
                "trackers.mlflow: no tracking URI; set trackers.mlflow.tracking_uri or the "
                "server's TRAINBUS_MLFLOW_TRACKING_URI"
            )


def tracker_subscribers(handle: JobHandle, bus: EventBus, settings: Settings) -> list[Subscriber]:
    """The tracker subscribers of one job run."""
    spec = handle.spec
    common: dict[str, Any] = {
        "job_id": handle.id,
        "bus": bus,
        "params": spec.model_dump(mode="json", exclude={"trackers"}),
        "log_every_n_steps": spec.trackers.log_every_n_steps,
        "max_buffered": settings.tracker_max_buffered,
    }
    built: list[Subscriber] = []
    for name, section in _sections(spec, settings).items():
        if name == "tensorboard":
            log_dir = (
                handle.job_dir / "tensorboard"
                if settings.tensorboard_dir is None
                else settings.tensorboard_dir / handle.id
            )
            built.append(TensorBoardExporter(log_dir=log_dir, **common))
        elif name == "mlflow":
            built.append(
                MLflowExporter(
                    job_dir=handle.job_dir,
                    tracking_uri=section.get("tracking_uri") or settings.mlflow_tracking_uri or "",
                    experiment=section.get("experiment") or settings.mlflow_experiment,
                    run_name=spec.name,
                    log_best_checkpoint=bool(section.get("log_best_checkpoint", False)),
                    **common,
                )
            )
        else:
            built.append(
                WandbExporter(
                    project=section.get("project") or settings.wandb_project,
                    entity=section.get("entity") or settings.wandb_entity,
                    mode=section.get("mode") or settings.wandb_mode,
                    directory=handle.job_dir,
                    **common,
                )
            )
    return built
