"""Dashboard: how fast a long job's page plots, and how many bytes the first load transfers.

A real server runs a one-epoch job; then 100,000 more events of that job (a training run's
mix: four batch events a batch, an epoch end every 500 batches) are written through the real
event store, and the server starts again on the same data. Headless Chromium (Debian's
``chromium``) opens the job page in fresh browser contexts (empty caches); the figure is the
time from navigation until the loss chart is plotted, the slowest of ``--runs``. The assets'
bytes are what the first load transferred for the page and its files (gzip as served).
Last line: one JSON object.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from trainbus.api import TrainbusClient
from trainbus.bus import Event, EventType
from trainbus.subscribers import EventStore

CHROMIUM = "/usr/bin/chromium"
LAUNCH_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]
TOKEN = "bench-token-0123456789"
BATCHES_PER_EPOCH = 500


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextmanager
def serving(data_dir: Path) -> Iterator[str]:
    """``trainbus serve`` in a process of its own (as users run it), until the block ends."""
    port = _free_port()
    command = [str(Path(sys.executable).parent / "trainbus"), "serve", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--log-level", "warning"]
    env = {**os.environ, "TRAINBUS_TOKEN": TOKEN}
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("trainbus serve did not become ready")
            time.sleep(0.05)  # start-up poll, bounded by the deadline
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(60)


def long_history(job_id: str, after_seq: int, count: int) -> list[Event]:
    events: list[Event] = []
    seq, step, now = after_seq, 0, time.time()
    batch_types = (
        EventType.TRAIN_BATCH_START,
        EventType.OPTIMIZER_STEP,
        EventType.BEFORE_ZERO_GRAD,
        EventType.TRAIN_BATCH_END,
    )
    while len(events) < count:
        step += 1
        epoch, batch = divmod(step - 1, BATCHES_PER_EPOCH)
        loss = 2.0 / (1 + step / 1000) + 0.05 * ((step * 7919) % 13) / 13
        for kind in batch_types:
            seq += 1
            data: dict[str, Any] = {"epoch": epoch, "batch": batch, "step": step}
            if kind is EventType.TRAIN_BATCH_END:
                data.update(loss=loss, lr=0.001, batch_size=32)
            events.append(Event(job_id, seq, kind, now, data))
        if batch == BATCHES_PER_EPOCH - 1:
            seq += 1
            metrics = {"train_loss": loss, "val_loss": loss * 1.1, "val_accuracy": 1 - loss / 3}
            events.append(
                Event(
                    job_id,
                    seq,
                    EventType.FIT_EPOCH_END,
                    now,
                    {"epoch": epoch, "step": step, "metrics": metrics},
                )
            )
    return events[:count]


def prepare(data_dir: Path, count: int) -> str:
    with serving(data_dir) as url, TrainbusClient(url, TOKEN) as client:
        spec = {
            "name": "long",
            "model": {"name": "mlp"},
            "dataset": {"name": "digits"},
            "epochs": 1,
            "seed": 0,
        }
        job_id: str = client.submit(spec)["id"]
        client.wait(job_id, timeout=120)
    with EventStore(data_dir / "trainbus.db") as store:
        events = long_history(job_id, store.last_seq(job_id), count)
        for start in range(0, len(events), 4096):
            store.write(events[start : start + 4096])
    return job_id


def measure(url: str, job_id: str, runs: int) -> tuple[list[float], int, int]:
    from playwright.sync_api import sync_playwright

    timings: list[float] = []
    asset_bytes = series_bytes = 0
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=LAUNCH_ARGS)
        try:
            for run in range(runs):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                context.add_init_script(f"sessionStorage.setItem('trainbus.token', '{TOKEN}')")
                page = context.new_page()
                responses: list[Any] = []

                def keep(response: Any, into: list[Any] = responses) -> None:
                    into.append(response)

                page.on("response", keep)
                started = time.perf_counter()
                page.goto(f"{url}/#/jobs/{job_id}")
                page.wait_for_selector("#chart-loss[data-ready] canvas", timeout=60_000)
                timings.append(time.perf_counter() - started)
                for response in responses:
                    timing = response.request.timing
                    print(
                        f"  run {run}: {timing['responseEnd']:7.1f} ms  {response.url[len(url) :]}"
                    )
                if run == 0:
                    for response in responses:
                        path = response.url[len(url) :]
                        size = response.request.sizes()["responseBodySize"]
                        if path in ("/", "/favicon.ico") or path.startswith(("/#", "/dashboard/")):
                            asset_bytes += size
                        elif "/series" in path:
                            series_bytes += size
                context.close()
        finally:
            browser.close()
    return timings, asset_bytes, series_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-") as folder:
        data_dir = Path(folder)
        job_id = prepare(data_dir, args.events)
        with serving(data_dir) as url:
            total = httpx.get(
                f"{url}/jobs/{job_id}/series?metric=loss",
                headers={"Authorization": f"Bearer {TOKEN}"},
                timeout=60,
            ).json()["series"]["loss"]["total"]
            timings, asset_bytes, series_bytes = measure(url, job_id, args.runs)
    print(f"job {job_id}: {args.events:,} stored events added, {total:,} loss points")
    print("job page (s): " + ", ".join(f"{t:.3f}" for t in timings))
    print(f"series bytes on the first load: {series_bytes:,}")
    print(
        json.dumps(
            {"bench": "dashboard", "job_page_s": round(max(timings), 3), "asset_bytes": asset_bytes}
        )
    )


if __name__ == "__main__":
    main()
