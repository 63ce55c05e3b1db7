"""Weights & Biases: a job as one W&B run (config, stepped metrics, checkpoints, exit code)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from trainbus.bus import EventBus

from ._trackers import EndState, RecordKind, TrackerBackend, TrackerRecord, TrackerSubscriber

__all__ = ["WandbExporter"]

_EXIT_CODES = {
    EndState.COMPLETED: 0,
    EndState.STOPPED: 1,
    EndState.FAILED: 1,
    EndState.INTERRUPTED: 1,
}


def wandb_run_id(job_id: str) -> str:
    """A W&B run id for ``job_id`` (W&B allows letters, digits, ``-`` and ``_``)."""
    return re.sub(r"[^A-Za-z0-9_-]", "-", job_id)[:64]


class _WandbBackend:
    def __init__(
        self,
        *,
        job_id: str,
        project: str,
        entity: str | None,
        mode: Literal["online", "offline", "disabled"],
        directory: Path,
    ) -> None:
        self.job_id = job_id
        self.project = project
        self.entity = entity
        self.mode = mode
        self.directory = directory
        self._run: Any = None

    def _open(self, params: dict[str, Any]) -> Any:
        import wandb  # the wandb extra

        self.directory.mkdir(parents=True, exist_ok=True)
        # Nothing W&B would gather about the process (git state, code, installed packages,
        # machine, system metrics): the job spec is the run's config, and that gathering
        # cost a job ~55 ms of CPU that training competes for.
        settings = wandb.Settings(
            silent=True,
            console="off",
            save_code=False,
            disable_code=True,
            disable_git=True,
            x_save_requirements=False,
            x_disable_machine_info=True,
            x_disable_stats=True,
            x_disable_meta=True,
        )
        # resume="allow" with the job's id: a resumed job continues its run; W&B ignores
        # what is logged again at steps it already holds, so curves do not double
        return wandb.init(
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            id=wandb_run_id(self.job_id),
            name=self.job_id,
            resume="allow",
            dir=str(self.directory),
            config=params,
            settings=settings,
            reinit="create_new",
        )

    def write(self, records: Sequence[TrackerRecord]) -> None:
        for record in records:
            if self._run is None:
                self._run = self._open(
                    dict(record.values) if record.kind is RecordKind.START else {}
                )
            run = self._run
            if record.kind is RecordKind.METRICS:
                run.log(dict(record.values), step=record.step)
            elif record.kind is RecordKind.CHECKPOINT:
                run.summary["checkpoint/latest"] = record.values.get("name")
                if record.values.get("best"):
                    run.summary["checkpoint/best"] = record.values.get("name")
            elif record.kind is RecordKind.END:
                state = EndState(record.values["state"])
                run.summary["trainbus/end_state"] = state.value
                run.finish(exit_code=_EXIT_CODES[state])
                self._run = None

    def close(self) -> None:
        if self._run is not None:
            with contextlib.suppress(Exception):  # the job is over; nobody to tell
                self._run.finish(exit_code=1)
            self._run = None


class WandbExporter(TrackerSubscriber):
    """Logs a job to Weights & Biases as one run whose id is derived from the job id.

    Config: the flattened job spec. Metrics: each epoch metric at its step,
    ``train_loss_step`` and ``lr`` every ``log_every_n_steps``. Summary:
    ``checkpoint/latest``, ``checkpoint/best``, ``trainbus/end_state``; the run finishes with
    exit code 0 when the job completed, 1 otherwise. A resumed job continues the same run
    (``resume="allow"``). ``mode="offline"`` writes only under ``directory`` (``wandb sync``
    uploads it later).

    :param project: the W&B project.
    :param entity: the W&B entity (team or user; default: the API key's).
    :param mode: ``online``, ``offline`` or ``disabled``.
    :param directory: where W&B keeps the run's files (``<job folder>/wandb`` in the server).
    Other parameters: :class:`TrackerSubscriber`.
    """

    tracker = "wandb"

    def __init__(
        self,
        *,
        job_id: str,
        bus: EventBus | None,
        project: str,
        directory: Path,
        entity: str | None = None,
        mode: Literal["online", "offline", "disabled"] = "online",
        **options: Any,
    ) -> None:
        super().__init__(job_id=job_id, bus=bus, **options)
        self.project = project
        self.entity = entity
        self.mode = mode
        self.directory = Path(directory)

    def make_backend(self) -> TrackerBackend:
        return _WandbBackend(
            job_id=self.job_id,
            project=self.project,
            entity=self.entity,
            mode=self.mode,
            directory=self.directory,
        )
