"""MLflow exporter against a real ``mlflow server`` (SQLite backend) on a loopback port:
params, stepped metrics and status read back with ``MlflowClient``; a resumed job continues
its run; the server killed mid-job and restarted costs training nothing and loses nothing."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from tests.conftest import free_port
from trainbus.bus import EventBus, EventType
from trainbus.subscribers import MLflowExporter

from .tracker_jobs import checkpoint_at_epoch, digits_spec, run_job

mlflow_tracking = pytest.importorskip("mlflow.tracking")


class MlflowServer:
    """``mlflow server`` in its own process group, restartable on the same port and store."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent))
        assert mlflow is not None
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with (self.folder / "server.log").open("ab") as log:
            self.process = self._spawn(mlflow, environment, log)

    def _spawn(self, mlflow: str, environment: dict[str, str], log: Any) -> Any:
        return subprocess.Popen(
            [
                *(mlflow, "server", "--host", "127.0.0.1", "--port", str(self.port)),
                *("--backend-store-uri", f"sqlite:///{self.folder / 'mlflow.db'}"),
                *("--artifacts-destination", str(self.folder / "artifacts"), "--workers", "1"),
            ],
            env=environment,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,  # setsid: the whole group (uvicorn, workers) is killed
        )

    def wait_healthy(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None and self.process.poll() is None, "server died"
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # an external process: polling its health is the only signal
        raise TimeoutError(f"mlflow server on {self.url} not healthy in {timeout} s")

    def kill(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.process = None


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.kill()


def _exporter(
    job_id: str, job_dir: Path, server: MlflowServer, experiment: str, **options: Any
) -> Any:
    def build(bus: EventBus) -> list[MLflowExporter]:
        return [
            MLflowExporter(
                job_id=job_id,
                bus=bus,
                job_dir=job_dir,
                tracking_uri=server.url,
                experiment=experiment,
                params=digits_spec().model_dump(mode="json"),
                log_every_n_steps=5,
                request_timeout=2.0,
                **options,
            )
        ]

    return build


def _run_id(job_dir: Path) -> str:
    import json

    return str(json.loads((job_dir / "trackers" / "mlflow.json").read_text())["run_id"])


async def test_params_metrics_status_and_resume_read_back(
    data_dir: Path, mlflow_server: MlflowServer
) -> None:
    job_dir = data_dir / "jobs" / "ml-1"
    build = _exporter("ml-1", job_dir, mlflow_server, "readback", log_best_checkpoint=True)
    first = await run_job("ml-1", digits_spec(), job_dir, build)
    assert not first.of(EventType.SUBSCRIBER_ERROR)
    client = mlflow_tracking.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = _run_id(job_dir)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.05"
    assert run.data.params["model.params.hidden_sizes"] == "[32]"
    assert run.data.tags["trainbus.job_id"] == "ml-1"
    assert run.data.tags["trainbus.end_state"] == "completed"
    epoch_ends = first.of(EventType.FIT_EPOCH_END)
    history = client.get_metric_history(run_id, "val_loss")
    assert [(m.step, m.value) for m in history] == [
        (e.data["step"], pytest.approx(e.data["metrics"]["val_loss"])) for e in epoch_ends
    ]
    step_losses = {m.step for m in client.get_metric_history(run_id, "train_loss_step")}
    assert step_losses == {
        e.data["step"] for e in first.of(EventType.TRAIN_BATCH_END) if e.data["step"] % 5 == 0
    }
    best = run.data.tags["trainbus.checkpoint.best"]
    assert client.list_artifacts(run_id, "checkpoints/best")  # the best checkpoint's files
    assert best in {e.data["name"] for e in first.of(EventType.CHECKPOINT_SAVED)}

    name, step = checkpoint_at_epoch(job_dir, 0)
    second = await run_job("ml-1", digits_spec(), job_dir, build, resume_from=name)
    assert _run_id(job_dir) == run_id  # the same run goes on
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trainbus.resumed_from_step"] == str(step)
    latest: dict[int, float] = {}
    for metric in sorted(
        client.get_metric_history(run_id, "val_loss"), key=lambda m: (m.step, m.timestamp)
    ):
        latest[metric.step] = metric.value  # MLflow plots the last value logged at a step
    resumed = {
        e.data["step"]: e.data["metrics"]["val_loss"] for e in second.of(EventType.FIT_EPOCH_END)
    }
    assert set(latest) == {e.data["step"] for e in epoch_ends}
    for at, value in resumed.items():
        assert latest[at] == pytest.approx(value)


async def test_server_killed_mid_job_costs_training_nothing_and_loses_nothing(
    data_dir: Path, mlflow_server: MlflowServer
) -> None:
    spec = digits_spec(epochs=4)
    reference = await run_job("ml-ref", spec, data_dir / "jobs" / "ml-ref", lambda bus: [])

    job_dir = data_dir / "jobs" / "ml-2"
    killed = threading.Event()

    def kill_after_first_epoch(trainer: Any) -> None:
        if trainer.epoch == 0 and not killed.is_set():
            mlflow_server.kill()
            killed.set()

    async def restart(bus: EventBus, handles: list[Any]) -> None:
        assert killed.is_set()
        await anyio.to_thread.run_sync(mlflow_server.start)

    try:
        run = await run_job(
            "ml-2",
            spec,
            job_dir,
            _exporter("ml-2", job_dir, mlflow_server, "outage", retry_max=0.5, close_timeout=60),
            prepare=lambda trainer: trainer.add_callback(
                "on_fit_epoch_end", kill_after_first_epoch
            ),
            after_run=restart,
        )
    finally:
        if mlflow_server.process is None:
            mlflow_server.start()
        await anyio.to_thread.run_sync(mlflow_server.wait_healthy)

    # training went on at its own pace while the tracker was down (it ended before the
    # server was even restarted)
    assert run.result.outcome.value == "completed"
    assert run.duration < 2 * reference.duration + 2.0
    errors = run.of(EventType.SUBSCRIBER_ERROR)
    train_end = run.of(EventType.TRAIN_END)[0]
    assert errors and errors[0].data["subscriber"] == "mlflow_tracker"
    assert errors[0].seq < train_end.seq
    assert errors[-1].data["error_type"] == "TrackerRecovered"
    assert not [e for e in errors if e.data["error_type"] == "TrackerRecordsDropped"]

    client = mlflow_tracking.MlflowClient(tracking_uri=mlflow_server.url)
    run_id = _run_id(job_dir)
    assert client.get_run(run_id).info.status == "FINISHED"
    epoch_ends = run.of(EventType.FIT_EPOCH_END)
    assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [
        e.data["step"] for e in epoch_ends
    ]
    step_losses = [m.step for m in client.get_metric_history(run_id, "train_loss_step")]
    batch_steps = [e.data["step"] for e in run.of(EventType.TRAIN_BATCH_END)]
    assert sorted(step_losses) == [step for step in batch_steps if step % 5 == 0]


async def test_a_server_that_never_answers_costs_one_bounded_call_per_try(data_dir: Path) -> None:
    # a listening socket that never accepts: connections open, requests get no answer
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        job_dir = data_dir / "jobs" / "ml-3"

        def build(bus: EventBus) -> list[MLflowExporter]:
            return [
                MLflowExporter(
                    job_id="ml-3",
                    bus=bus,
                    job_dir=job_dir,
                    tracking_uri=url,
                    request_timeout=1.0,
                    retry_initial=0.2,
                    retry_max=0.5,
                    close_timeout=1.0,
                )
            ]

        started = time.monotonic()
        run = await run_job("ml-3", digits_spec(epochs=2), job_dir, build)
        drained = time.monotonic() - started
    assert run.result.outcome.value == "completed"
    errors = run.of(EventType.SUBSCRIBER_ERROR)
    # MLflow's own default would hold the first call for minutes (7 retries, 120 s timeout)
    assert errors and "timed out" in errors[0].data["message"].lower()
    dropped = [e for e in errors if e.data["error_type"] == "TrackerRecordsDropped"]
    assert dropped and "did not answer before the job ended" in dropped[-1].data["message"]
    assert drained < run.duration + 10
