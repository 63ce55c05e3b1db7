"""MLflow: a job as one MLflow run (params, stepped metrics, checkpoints, end status)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from trainbus.bus import EventBus

from ._checkpoint_layout import checkpoint_path
from ._errors import CheckpointNotFound
from ._trackers import EndState, RecordKind, TrackerBackend, TrackerRecord, TrackerSubscriber

__all__ = ["MLflowExporter"]

logger = logging.getLogger(__name__)

_STATUS = {
    EndState.COMPLETED: "FINISHED",
    EndState.STOPPED: "KILLED",
    EndState.FAILED: "FAILED",
    EndState.INTERRUPTED: "KILLED",
}

# MLflow reads these for each HTTP call; they are process-wide, so calls take turns.
_ENVIRONMENT_LOCK = threading.Lock()


@contextmanager
def _bounded_calls(timeout: float) -> Iterator[None]:
    """Bound each MLflow HTTP call for the duration of the block: no retries of its own
    (the subscriber retries with back-off, and a retried POST could log twice), ``timeout``
    seconds, no run URL printed to stdout, no usage telemetry."""
    overrides = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, round(timeout))),
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
        # no usage telemetry from a server's jobs (it also cost each call CPU)
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    with _ENVIRONMENT_LOCK:
        saved = {key: os.environ.get(key) for key in overrides}
        os.environ.update(overrides)
        try:
            yield
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


class _MLflowBackend:
    def __init__(
        self,
        *,
        job_id: str,
        job_dir: Path,
        tracking_uri: str,
        experiment: str,
        run_name: str | None,
        log_best_checkpoint: bool,
        request_timeout: float,
    ) -> None:
        from mlflow.tracking import MlflowClient  # the mlflow extra

        self.job_id = job_id
        self.job_dir = job_dir
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.experiment = experiment
        self.run_name = run_name or job_id
        self.log_best_checkpoint = log_best_checkpoint
        self.request_timeout = request_timeout
        self.run_id: str | None = self._saved_run_id()
        self._resumed = False
        self._params_logged = False

    @property
    def _run_file(self) -> Path:
        return self.job_dir / "trackers" / "mlflow.json"

    def _saved_run_id(self) -> str | None:
        try:
            return str(json.loads(self._run_file.read_text())["run_id"])
        except (OSError, ValueError, KeyError):
            return None

    def _start(self, record: TrackerRecord) -> None:
        client = self.client
        if self.run_id is None:
            experiment = client.get_experiment_by_name(self.experiment)
            experiment_id = (
                client.create_experiment(self.experiment)
                if experiment is None
                else experiment.experiment_id
            )
            run = client.create_run(
                experiment_id, run_name=self.run_name, tags={"trainbus.job_id": self.job_id}
            )
            self.run_id = run.info.run_id
            self._run_file.parent.mkdir(parents=True, exist_ok=True)
            self._run_file.write_text(json.dumps({"run_id": self.run_id}))
        elif not self._resumed:
            # the same run goes on: RUNNING again; values at replayed steps are logged anew
            client.update_run(self.run_id, status="RUNNING")
            client.set_tag(self.run_id, "trainbus.resumed_from_step", str(record.step))
        self._resumed = True
        if not self._params_logged:
            from mlflow.entities import Param

            params = [Param(key[:250], _param_value(value)) for key, value in record.values.items()]
            for start in range(0, len(params), 100):
                # a resumed run logs the same values again, which MLflow accepts
                client.log_batch(self.run_id, params=params[start : start + 100])
            self._params_logged = True

    def write(self, records: Sequence[TrackerRecord]) -> None:
        from mlflow.entities import Metric

        with _bounded_calls(self.request_timeout):
            # metrics and tags go out together, in as few log-batch requests as possible
            metrics: list[Any] = []
            tags: dict[str, str] = {}
            now = int(time.time() * 1000)
            for record in records:
                if record.kind is RecordKind.START:
                    self._log_batch(metrics, tags)
                    self._start(record)
                    continue
                if self.run_id is None:  # the stream began past train_start: start plainly
                    self._start(TrackerRecord(RecordKind.START, 0, {}))
                assert self.run_id is not None
                if record.kind is RecordKind.METRICS:
                    metrics.extend(
                        Metric(key, value, now, record.step) for key, value in record.values.items()
                    )
                elif record.kind is RecordKind.CHECKPOINT:
                    name = str(record.values.get("name"))
                    tags["trainbus.checkpoint.latest"] = name
                    if record.values.get("best"):
                        tags["trainbus.checkpoint.best"] = name
                        if self.log_best_checkpoint:
                            self._upload(name)
                elif record.kind is RecordKind.END:
                    tags["trainbus.end_state"] = str(record.values["state"])
                    self._log_batch(metrics, tags)
                    status = _STATUS[EndState(record.values["state"])]
                    self.client.set_terminated(self.run_id, status=status)
            self._log_batch(metrics, tags)

    def _log_batch(self, metrics: list[Any], tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        if not metrics and not tags:
            return
        assert self.run_id is not None
        run_tags = [RunTag(key, value) for key, value in tags.items()]
        for start in range(0, max(len(metrics), 1), 900):
            self.client.log_batch(
                self.run_id,
                metrics=metrics[start : start + 900],
                tags=run_tags if start == 0 else [],
            )
        metrics.clear()
        tags.clear()

    def _upload(self, name: str) -> None:
        assert self.run_id is not None
        try:
            folder = checkpoint_path(self.job_dir, name)
        except CheckpointNotFound:  # pruned before the tracker got to it
            logger.info("job %s: checkpoint %s gone before upload", self.job_id, name)
            return
        self.client.log_artifacts(self.run_id, str(folder), "checkpoints/best")

    def close(self) -> None:
        pass


def _param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:6000]


class MLflowExporter(TrackerSubscriber):
    """Logs a job to an MLflow tracking server as one run.

    Params: the flattened job spec. Metrics: each epoch metric at its step,
    ``train_loss_step`` and ``lr`` every ``log_every_n_steps``. Tags:
    ``trainbus.job_id``, ``trainbus.checkpoint.latest`` / ``.best``, ``trainbus.end_state``;
    with ``log_best_checkpoint`` each new best checkpoint is uploaded under
    ``checkpoints/best``. The run ends FINISHED (completed), KILLED (stopped, interrupted) or
    FAILED. Its id is kept in ``<job folder>/trackers/mlflow.json``, so a resumed job continues
    the same run; the steps it replays are logged again at the same steps.

    Each MLflow call is bounded (no retries of MLflow's own, ``request_timeout`` seconds): a
    server that is down costs the writer thread a retry with back-off, never the training.

    :param job_dir: the job's folder.
    :param tracking_uri: the MLflow tracking server (``http://host:5000``) or store URI.
    :param experiment: the experiment's name (created when missing).
    :param run_name: the run's name (default: the job id).
    :param log_best_checkpoint: upload each new best checkpoint as an artifact.
    :param request_timeout: seconds one HTTP call may take.
    Other parameters: :class:`TrackerSubscriber`.
    """

    tracker = "mlflow"

    def __init__(
        self,
        *,
        job_id: str,
        bus: EventBus | None,
        job_dir: Path,
        tracking_uri: str,
        experiment: str = "trainbus",
        run_name: str | None = None,
        log_best_checkpoint: bool = False,
        request_timeout: float = 5.0,
        **options: Any,
    ) -> None:
        super().__init__(job_id=job_id, bus=bus, **options)
        self.job_dir = Path(job_dir)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.run_name = run_name
        self.log_best_checkpoint = log_best_checkpoint
        self.request_timeout = request_timeout

    def make_backend(self) -> TrackerBackend:
        return _MLflowBackend(
            job_id=self.job_id,
            job_dir=self.job_dir,
            tracking_uri=self.tracking_uri,
            experiment=self.experiment,
            run_name=self.run_name,
            log_best_checkpoint=self.log_best_checkpoint,
            request_timeout=self.request_timeout,
        )
