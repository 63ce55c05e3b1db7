"""The Ultralytics example run as a user runs it, with the real Ultralytics, against a real
server: watched over the WebSocket stream while its learning rate is set, a checkpoint asked
for, paused, resumed and stopped from the API, and stopped by the server's early-stop
controller.

Ultralytics needs torchvision, which needs another torch than this venv's: the example runs in
``.venv-ultralytics`` (``make test`` builds it; see the Makefile), the server here. The
integration itself imports nothing of Ultralytics: how it names metrics is checked here too.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.api.server import LiveServer
from trainbus.api import TrainbusClient
from trainbus.sdk.ultralytics import _metric_name

from .examples import ROOT, job_of, start_example, wait_state, wait_step

PYTHON = ROOT / ".venv-ultralytics" / "bin" / "python"
EXAMPLE = "sdk_ultralytics.py"

needs_ultralytics = pytest.mark.skipif(
    not PYTHON.exists(),
    reason=f"{PYTHON} is missing: `make .venv-ultralytics/.installed` builds it (`make test` does)",
)


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("metrics/mAP50-95(B)", "val_map50_95"),
        ("metrics/mAP50(B)", "val_map50"),
        ("metrics/precision(B)", "val_precision"),
        ("metrics/recall(M)", "val_recall_mask"),
        ("metrics/mAP50-95(P)", "val_map50_95_pose"),
        ("metrics/accuracy_top1", "val_accuracy_top1"),
        ("val/box_loss", "val_box_loss"),
        ("train/dfl_loss", "train_dfl_loss"),
        ("lr/pg0", None),
        ("fitness", None),
    ],
)
def test_ultralytics_metrics_take_the_names_early_stopping_monitors(
    key: str, name: str | None
) -> None:
    """Detection, segmentation (M), pose (P) and classification keys as Ultralytics' metrics
    classes name them; the learning rate is reported on its own."""
    assert _metric_name(key) == name


def _assert_epochs_are_real(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``fit_epoch_end`` per trained epoch, each validated: Ultralytics' extra one for its
    final validation of best.pt (epoch one past the last) is not among them."""
    epochs = [e for e in events if e["type"] == "fit_epoch_end"]
    assert [e["data"]["epoch"] for e in epochs] == list(range(len(epochs)))
    assert all("val_map50_95" in e["data"]["metrics"] for e in epochs), epochs
    teardown = [e for e in events if e["type"] == "teardown"]
    assert teardown[-1]["data"]["epoch"] == epochs[-1]["data"]["epoch"]
    return epochs


@needs_ultralytics
def test_a_yolo_training_is_watched_steered_paused_resumed_and_stopped(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "yolo-steered"
    process = start_example(server, PYTHON, EXAMPLE, tmp_path, "--run-id", run_id,
                            "--epochs", "100", "--batch-seconds", "0.05")  # fmt: skip
    watched: list[dict[str, Any]] = []
    try:
        with TrainbusClient(server.url, server.token) as client:
            job_id = job_of(client, run_id, process)

            def watch() -> None:
                with TrainbusClient(server.url, server.token) as watcher:
                    watched.extend(watcher.stream(job_id))

            watcher = threading.Thread(target=watch)
            watcher.start()
            wait_state(client, job_id, "running")
            wait_step(client, job_id, 3)
            client.set_lr(job_id, 0.0123)
            client.save(job_id)
            client.pause(job_id)
            paused = wait_state(client, job_id, "paused")
            time.sleep(0.3)
            assert client.job(job_id)["step"] == paused["step"], "a paused training went on"
            client.resume(job_id)
            resumed = wait_state(client, job_id, "running")
            wait_step(client, job_id, resumed["step"] + 8)  # past Ultralytics' warm-up
            client.stop(job_id)
            output = process.communicate(timeout=90)[0]
            assert process.returncode == 0, output[-3000:]
            record = wait_state(client, job_id, "stopped")
            watcher.join(timeout=60)
            assert not watcher.is_alive(), "the stream did not end with the job"
            events = client.events(job_id, limit=1000)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    types = [event["type"] for event in watched]
    for expected in ("train_start", "train_batch_end", "lr_changed", "model_save", "job_paused",
                     "job_resumed", "job_stopping", "fit_epoch_end", "job_stopped"):  # fmt: skip
        assert expected in types, expected
    assert types.index("job_paused") < types.index("job_resumed") < types.index("job_stopped")
    assert record["epoch"] < 99

    # the save command and the pause wrote Ultralytics checkpoints beside last.pt, not over it
    saves = {
        e["data"]["save_reason"]: e["data"]["step"] for e in watched if e["type"] == "model_save"
    }
    weights = tmp_path / "runs" / run_id / "weights"
    for reason in ("command", "pause"):
        checkpoint = weights / f"trainbus-{reason}-step={saves[reason]}.pt"
        assert checkpoint.stat().st_size > 1_000_000, sorted(weights.iterdir())
    assert (weights / "last.pt").exists()

    # set_lr rescaled Ultralytics' schedule: once warm-up is over, the rate decays from it
    batches = [e for e in events if e["type"] == "train_batch_end"]
    assert 0.0123 * 0.5 < batches[-1]["data"]["lr"] <= 0.0123, batches[-1]
    epochs = _assert_epochs_are_real(events)
    assert epochs[-1]["data"]["step"] == record["step"]  # the stopped epoch was validated


@needs_ultralytics
def test_a_yolo_training_is_stopped_by_the_early_stop_controller(
    server: LiveServer, tmp_path: Path
) -> None:
    run_id = "yolo-early-stop"
    epochs_asked = 10
    process = start_example(server, PYTHON, EXAMPLE, tmp_path, "--run-id", run_id, "--epochs",
                            str(epochs_asked), "--early-stop-patience", "1")  # fmt: skip
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output[-3000:]
    with TrainbusClient(server.url, server.token) as client:
        job_id = job_of(client, run_id, process)
        record = wait_state(client, job_id, "completed")
        events = client.events(job_id, limit=1000)
    epochs = _assert_epochs_are_real(events)
    assert record["stop_reason"], record
    assert 2 <= len(epochs) < epochs_asked, "the controller did not stop the training"
    values = [e["data"]["metrics"]["val_map50_95"] for e in epochs]
    assert values[-1] <= max(values[:-1]), "it stopped on an epoch that improved"
    (early_stop,) = [e for e in events if e["type"] == "early_stop"]
    assert early_stop["data"]["epoch"] == epochs[-1]["data"]["epoch"]
    assert early_stop["data"]["monitor"] == "val_map50_95"
    # Ultralytics ended training at the epoch the controller stopped, and kept its checkpoints
    assert (tmp_path / "runs" / run_id / "weights" / "best.pt").exists()
