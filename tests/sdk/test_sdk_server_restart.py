"""An SDK run outlives its server: the server is SIGKILLed mid-run and started again; the run
attaches again on its own, and the job's stored stream has every event once, in order.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

import httpx
import pytest

from tests.conftest import free_port, serve_command
from trainbus.api import TrainbusClient
from trainbus.sdk import init

from .loop import digits, model_and_optimizer, train

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX signals")

TOKEN = "sdk-restart-token-0123456789"
EPOCHS = 20


def _serve(port: int, data_dir: Path, log: BinaryIO) -> subprocess.Popen[bytes]:
    process = subprocess.Popen(
        serve_command(port, data_dir, TOKEN),
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "TRAINBUS_RUN_JOBS_IN": "thread"},
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, "the server exited at start (its log: server.log)"
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)  # polling interval, bounded by the deadline


def test_an_sdk_run_survives_a_server_sigkill_with_its_stream_whole(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data_dir = tmp_path / "data"
    log = (tmp_path / "server.log").open("ab")
    server = _serve(port, data_dir, log)
    model, optimizer = model_and_optimizer()
    data = digits()
    run = init("survivor", url=url, token=TOKEN, epochs=EPOCHS, model=model,
               optimizer=optimizer, checkpoint_dir=tmp_path / "ckpt")  # fmt: skip
    job_id = run.job_id
    assert job_id is not None
    outcome: dict[str, Any] = {}

    def loop() -> None:
        with run:
            # 9 s in all: the restart, with the server's imports, lands well inside it
            outcome["trained"] = train(run, model, optimizer, data, batch_seconds=0.02)

    thread = threading.Thread(target=loop)
    thread.start()
    restarted_at_step = 0
    try:
        steps_per_epoch = len(data.train)
        while run.step < 2 * steps_per_epoch + 5:  # mid-epoch, events in flight
            assert thread.is_alive()
            time.sleep(0.01)  # polling interval; the loop itself bounds it
        server.send_signal(signal.SIGKILL)
        server.wait(timeout=30)
        killed_at_step = run.step
        time.sleep(0.5)  # the run trains on without a server
        assert run.step > killed_at_step, "the loop waited for the network"
        server = _serve(port, data_dir, log)
        restarted_at_step = run.step
        thread.join(timeout=120)
        assert not thread.is_alive(), "the run did not end"
        with TrainbusClient(url, TOKEN) as client:
            deadline = time.monotonic() + 30
            while (record := client.job(job_id))["state"] != "completed":
                assert time.monotonic() < deadline, record
                time.sleep(0.05)  # polling interval, bounded by the deadline
            events: list[dict[str, Any]] = []
            while page := client.events(job_id, after_seq=events[-1]["seq"] if events else 0):
                events.extend(page)
    finally:
        run.should_stop = True
        thread.join(timeout=60)
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
        log.close()
    total_steps = EPOCHS * len(data.train)
    assert outcome["trained"].batches == total_steps
    assert record["step"] == total_steps
    # A killed server may have sent seqs live that it never stored: the restarted server
    # numbers after them and stores a gap naming them (seqs, not events: the run sends its
    # events again). Nothing else may jump.
    seqs = [e["seq"] for e in events]
    skipped = [(e["data"]["from_seq"], e["data"]["to_seq"]) for e in events if e["type"] == "gap"]
    assert len(skipped) == 1, skipped
    jumps = [(a + 1, b - 1) for a, b in itertools.pairwise(seqs) if b != a + 1]
    assert jumps == skipped, (jumps, skipped)
    batch_steps = [e["data"]["step"] for e in events if e["type"] == "train_batch_end"]
    assert batch_steps == list(range(1, total_steps + 1)), "a batch is missing or doubled"
    epochs = [e["data"]["epoch"] for e in events if e["type"] == "fit_epoch_end"]
    assert epochs == list(range(EPOCHS))
    assert [e["type"] for e in events].count("train_start") == 1
    assert restarted_at_step < total_steps, "the run ended before the server was back"
