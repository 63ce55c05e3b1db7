"""Concurrency: N identical jobs at once through a real ``trainbus serve`` against one alone,
and N bare training processes of the same work against one (the machine's own limit), in
alternating rounds. Each job is a worker process of its own, so N jobs should scale as N
processes do.

Last line: one JSON object; ``scaling`` = N x t(1) / t(N) for jobs through the server,
``bare_scaling`` the same for bare processes, ``ratio_to_bare`` = scaling / bare_scaling
(1.00: jobs scale exactly as bare processes), ``startup_p50_s`` the median time from a job's
``job_queued`` to its first ``train_batch_end``.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

TOKEN = "bench-concurrency-token-0123456789"

SPEC: dict[str, Any] = {
    "model": {"name": "mlp", "params": {"hidden_sizes": [256, 256]}},
    "dataset": {
        "name": "synthetic_classification",
        "params": {"n_samples": 16_000, "n_features": 32, "n_classes": 10},
    },
    "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
    "batch_size": 64,
    "seed": 1,
    "torch_threads": 1,
}

BARE = """
import sys, time, torch
import torch._dynamo  # as the fork server has it: a process's first optimizer step imports it
from trainbus.worker import JobSpec, default_registry
spec = JobSpec.model_validate_json(sys.argv[1])
torch.set_num_threads(1)
entry = default_registry().dataset(spec.dataset.name)
data = entry.load(entry.params.model_validate(spec.dataset.params), spec.seed, 0.2, None)
model_entry = default_registry().model(spec.model.name)
model = model_entry.build(model_entry.params.model_validate(spec.model.params),
                          data.num_features, data.output_size)
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
loss_fn = torch.nn.CrossEntropyLoss()
print("ready", flush=True)
sys.stdin.readline()  # every process starts training at the same moment
started = time.perf_counter()
for epoch in range(spec.epochs):
    order = torch.randperm(len(data.y_train))
    for start in range(0, len(order), spec.batch_size):
        index = order[start : start + spec.batch_size]
        loss = loss_fn(model(data.x_train[index]), data.y_train[index])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    with torch.no_grad():
        loss_fn(model(data.x_val), data.y_val).item()
print(time.perf_counter() - started, flush=True)
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def bare(spec: dict[str, Any], count: int) -> float:
    """Wall time of ``count`` bare processes training at once (imports excluded)."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", BARE, json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    for process in processes:
        assert process.stdout is not None and process.stdout.readline().strip() == "ready"
    started = time.perf_counter()
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    for process in processes:
        process.communicate(timeout=600)
    return time.perf_counter() - started


def jobs(client: httpx.Client, spec: dict[str, Any], count: int) -> tuple[float, list[float]]:
    """From the first job's start to the last one's end, for ``count`` jobs submitted
    together; and each job's start-up (queued to first ``train_batch_end``)."""
    ids = [client.post("/jobs", json=spec).json()["id"] for _ in range(count)]
    deadline = time.monotonic() + 600
    while True:
        records = [client.get(f"/jobs/{job_id}").json() for job_id in ids]
        if all(r["state"] in ("completed", "failed", "stopped") for r in records):
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"jobs did not end: {records}")
        time.sleep(1.0)  # the times come from the records: each poll only loads the server
    if any(r["state"] != "completed" for r in records):
        raise SystemExit(f"a job did not complete: {records}")
    startups = []
    for job_id in ids:
        events = client.get(
            f"/jobs/{job_id}/events", params={"types": "job_queued,train_batch_end", "limit": 2}
        ).json()
        startups.append(events[1]["time"] - events[0]["time"])
    return max(r["ended_at"] for r in records) - min(r["started_at"] for r in records), startups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="N")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    spec = {**SPEC, "epochs": args.epochs}
    times: dict[str, list[float]] = {"one": [], "many": [], "bare_one": [], "bare_many": []}
    startups: list[float] = []
    with tempfile.TemporaryDirectory() as folder:
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "trainbus.api.cli", "--token", TOKEN, "serve", "--port",
             str(port), "--data-dir", str(Path(folder) / "data"), "--log-level", "warning"],
            env={**os.environ, "TRAINBUS_MAX_RUNNING_JOBS": str(args.jobs)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30
            ) as client:
                deadline = time.monotonic() + 60
                while True:
                    try:
                        if client.get("/readyz").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    if time.monotonic() > deadline:
                        raise SystemExit("trainbus serve did not start")
                    time.sleep(0.05)  # polling interval while it starts, bounded
                jobs(client, {**spec, "epochs": 1}, 1)  # warm-up: the fork server's imports
                for _ in range(args.rounds):
                    elapsed, started = jobs(client, spec, 1)
                    times["one"].append(elapsed)
                    startups += started
                    elapsed, started = jobs(client, spec, args.jobs)
                    times["many"].append(elapsed)
                    startups += started
                    times["bare_one"].append(bare(spec, 1))
                    times["bare_many"].append(bare(spec, args.jobs))
                    print({k: round(v[-1], 3) for k, v in times.items()}, file=sys.stderr)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    median = {name: statistics.median(values) for name, values in times.items()}
    scaling = args.jobs * median["one"] / median["many"]
    bare_scaling = args.jobs * median["bare_one"] / median["bare_many"]
    result = {
        "bench": "concurrency",
        "jobs": args.jobs,
        "scaling": round(scaling, 3),
        "bare_scaling": round(bare_scaling, 3),
        "ratio_to_bare": round(scaling / bare_scaling, 3),
        "startup_p50_s": round(statistics.median(startups), 3),
        "seconds": {name: [round(t, 3) for t in values] for name, values in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
