"""Training overhead: the same work as a bare hand-written torch loop, as a trainbus job
that publishes every batch event to four lossless subscribers, and as one with every default
subscriber (``bench/_all_subscribers.py``), alternated in one process. With ``--trackers``, a
fourth run adds the TensorBoard, MLflow and W&B (offline) exporters to every default
subscriber; ``ratio_trackers`` is its time over the every-subscriber run's (1.00 = the
trackers cost training nothing).

With ``--whole-path`` (the default for ``--workload realistic``) each round also trains the
same spec as a job through a real ``trainbus serve`` (worker process, bridge, server-side
store, exporter and resource monitor, a checkpoint each epoch, both controllers) and runs the
bare loop in a fresh process of its own; ``ratio_whole_path`` is the job's training time (its
``train_start`` to its ``train_end``) over that bare process's loop.

Last line: one JSON object; ``ratio`` is trainbus wall time over bare wall time (1.00 = free),
``ratio_all_subscribers`` the same for the run with every default subscriber; the ``cpu_``
ratios compare CPU time of all threads (steadier on a busy machine).
"""

from __future__ import annotations

# isort: split

import argparse
import contextlib
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import httpx
import torch

from trainbus.bus import ControlChannel, Event, EventBus, Subscriber
from trainbus.worker import JobSpec, Trainer, default_registry

sys.path.append(str(Path(__file__).resolve().parent))  # last: ``bus`` is imported already
from _all_subscribers import PARTS, TRACKER_PARTS, all_subscribers_run
from _server import serve, train_job

TOKEN = "bench-overhead-token-0123456789"

# each sized so that the bare run of the default 3 epochs takes a second or more on this
# machine: a shorter one lets fixed costs (a checkpoint an epoch) pass for per-step ones
WORKLOADS: dict[str, dict[str, int]] = {
    "tiny": {"batch_size": 64, "hidden": 64, "samples": 160_000},
    "typical": {"batch_size": 256, "hidden": 1024, "samples": 64_000},
    # epochs of about half a second or more, as real jobs have: the every-subscriber run
    # (a checkpoint each epoch) is the figure to read
    "realistic": {"batch_size": 256, "hidden": 1024, "samples": 128_000},
}


class Consumer(Subscriber):
    """A lossless subscriber that touches every event."""

    max_batch = 4096

    def __init__(self, index: int) -> None:
        self.index = index
        self.count = 0

    @property
    def name(self) -> str:
        return f"consumer_{self.index}"

    async def on_events(self, events: Sequence[Event]) -> None:
        self.count += len(events)


def make_spec(args: argparse.Namespace) -> JobSpec:
    return JobSpec.model_validate(
        {
            "model": {"name": "mlp", "params": {"hidden_sizes": [args.hidden]}},
            "dataset": {
                "name": "synthetic_classification",
                "params": {"n_samples": args.samples, "n_features": 32, "n_classes": 10},
            },
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "seed": 1,
            "batch_event_every": 1,
            "checkpoint": {"enabled": False},
        }
    )


def bare_loop(spec: JobSpec, data_dir: Path) -> tuple[float, int, float]:
    """What a user writes by hand: shuffle, forward, backward, step, log the loss, validate
    (loss and accuracy)."""
    entry = default_registry().dataset(spec.dataset.name)
    data = entry.load(entry.params.model_validate(spec.dataset.params), spec.seed, 0.2, data_dir)
    torch.manual_seed(spec.seed)
    model_entry = default_registry().model(spec.model.name)
    model = model_entry.build(
        model_entry.params.model_validate(spec.model.params), data.num_features, data.output_size
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    batch_size = spec.batch_size
    started = time.perf_counter()
    cpu_started = time.process_time()
    samples = 0
    for epoch in range(spec.epochs):
        model.train()
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
        order = torch.randperm(len(data.y_train), generator=generator)
        total = 0.0
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            inputs, targets = data.x_train[index], data.y_train[index]
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item() * len(targets)
            samples += len(targets)
        model.eval()
        with torch.no_grad():  # validation loss and accuracy, as the trainer reports them
            val_loss, correct = 0.0, 0
            for start in range(0, len(data.y_val), batch_size):
                outputs = model(data.x_val[start : start + batch_size])
                targets = data.y_val[start : start + batch_size]
                val_loss += loss_fn(outputs, targets).item() * len(targets)
                correct += int((outputs.argmax(1) == targets).sum())
    return time.perf_counter() - started, samples, time.process_time() - cpu_started


async def trainbus_run(spec: JobSpec, data_dir: Path) -> tuple[float, int, int, float]:
    async with EventBus() as bus:
        consumers = [Consumer(i) for i in range(4)]
        for consumer in consumers:
            bus.attach(consumer)
        control = ControlChannel("overhead", publish=bus.publish)
        trainer = await anyio.to_thread.run_sync(
            lambda: Trainer(
                job_id="overhead", spec=spec, bus=bus, control=control, data_dir=data_dir
            )
        )
        started = time.perf_counter()
        cpu_started = time.process_time()  # every thread: training, event loop, subscribers
        await anyio.to_thread.run_sync(trainer.run)
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu_started
        samples = spec.epochs * len(trainer.y_train)
        published = bus.last_seq("overhead")
        await bus.aclose()
    if any(c.count != published for c in consumers):
        raise SystemExit("a lossless subscriber missed events")
    return elapsed, samples, published, cpu


def whole_path_spec(spec: JobSpec, threads: int) -> dict[str, Any]:
    """``spec`` as a job with every default subscriber: a checkpoint each epoch and both
    controllers (patient enough never to act), its worker on ``threads`` torch threads."""
    body = spec.model_dump(mode="json")
    body["checkpoint"] = {**body["checkpoint"], "enabled": True, "every_n_epochs": 1}
    body["early_stop"] = {**body["early_stop"], "enabled": True, "patience": 100}
    body["lr_plateau"] = {**body["lr_plateau"], "enabled": True, "patience": 100}
    body["torch_threads"] = threads
    return body


def job_run(client: httpx.Client, body: dict[str, Any]) -> float:
    """Train ``body`` as a job through the server: its ``train_start`` to its ``train_end``."""
    return train_job(client, body)[0]


def bare_process(spec: JobSpec, threads: int) -> float:
    """The bare loop in a fresh process of its own (imports and data excluded)."""
    result = subprocess.run(
        [sys.executable, __file__, "--bare-child", spec.model_dump_json(), "--threads",
         str(threads)],
        capture_output=True,
        text=True,
        check=True,
    )  # fmt: skip
    return float(json.loads(result.stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, help="overrides the workload's")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="tiny",
        help="tiny: batch 64, hidden 64 (a ~0.4 ms step: the worst case for per-batch costs); "
        "typical: batch 256, hidden 1024 (a ~2 ms step, still small); realistic: typical's "
        "step on 128,000 samples (epochs of 0.5 s or more)",
    )
    parser.add_argument("--batch-size", type=int, help="overrides the workload's")
    parser.add_argument("--hidden", type=int, help="overrides the workload's")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timing)")
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also run each default subscriber alone (as many rounds) and report its ratio",
    )
    parser.add_argument(
        "--trackers",
        action="store_true",
        help="also run every default subscriber plus the TensorBoard, MLflow and W&B "
        "(offline) exporters, and report ratio_trackers (needs the three extras)",
    )
    parser.add_argument(
        "--mlflow-uri",
        help="MLflow tracking server for --trackers (default: an `mlflow server` the bench "
        "starts on a loopback port, SQLite behind it)",
    )
    parser.add_argument(
        "--whole-path",
        action=argparse.BooleanOptionalAction,
        help="also train each round as a job through a real server, against the bare loop in "
        "a process of its own (default: with --workload realistic)",
    )
    parser.add_argument("--bare-child", help=argparse.SUPPRESS)  # JobSpec JSON: run it bare
    args = parser.parse_args()
    if args.bare_child:
        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as folder:
            seconds = bare_loop(JobSpec.model_validate_json(args.bare_child), Path(folder))[0]
        print(json.dumps({"seconds": seconds}))
        return
    if args.whole_path is None:
        args.whole_path = args.workload == "realistic"
    for name, value in WORKLOADS[args.workload].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    spec = make_spec(args)
    data_dir = Path(tempfile.mkdtemp(prefix="trainbus-bench-"))
    with contextlib.ExitStack() as stack:
        mlflow_uri = args.mlflow_uri
        if args.trackers and not mlflow_uri:
            mlflow_uri = stack.enter_context(_mlflow_server(data_dir))
        client = None
        if args.whole_path:
            server, url = serve(data_dir, TOKEN)
            stack.callback(server.wait, 60)
            stack.callback(server.send_signal, signal.SIGTERM)
            client = stack.enter_context(
                httpx.Client(
                    base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
                )
            )
        _measure(args, spec, data_dir, mlflow_uri or "", client)


@contextlib.contextmanager
def _mlflow_server(data_dir: Path) -> Iterator[str]:
    """A local ``mlflow server`` (SQLite store) in its own process group, for the bench."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mlflow = Path(sys.executable).parent / "mlflow"
    process = subprocess.Popen(
        [
            *(str(mlflow), "server", "--host", "127.0.0.1", "--port", str(port)),
            *("--backend-store-uri", f"sqlite:///{data_dir / 'mlflow.db'}", "--workers", "1"),
            *("--artifacts-destination", str(data_dir / "mlflow-artifacts")),
        ],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise SystemExit("the mlflow server did not start") from None
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _measure(
    args: argparse.Namespace,
    spec: JobSpec,
    data_dir: Path,
    mlflow_uri: str,
    client: httpx.Client | None,
) -> None:
    with_trackers = (*PARTS, *TRACKER_PARTS)
    bare_loop(spec, data_dir)  # warm-up: caches, allocator, lazy imports
    anyio.run(trainbus_run, spec, data_dir)
    anyio.run(all_subscribers_run, spec, data_dir)
    job_body = whole_path_spec(spec, args.threads)
    if client is not None:  # and the server's fork server, its first job
        job_run(client, {**job_body, "epochs": 1})
    whole: dict[str, list[float]] = {"bare_process": [], "job": []}
    if args.trackers:  # and the trackers' imports, their first connection
        anyio.run(all_subscribers_run, spec, data_dir, with_trackers, mlflow_uri)
    walls: dict[str, list[float]] = {"bare": [], "trainbus": [], "all": [], "trackers": []}
    cpus: dict[str, list[float]] = {"bare": [], "trainbus": [], "all": [], "trackers": []}
    events = all_events = samples = 0
    for round_ in range(args.rounds):
        bare_seconds, samples, bare_cpu = bare_loop(spec, data_dir)
        bus_seconds, _, events, bus_cpu = anyio.run(trainbus_run, spec, data_dir)
        all_seconds, _, all_events, all_cpu = anyio.run(all_subscribers_run, spec, data_dir)
        runs = [
            ("bare", bare_seconds, bare_cpu),
            ("trainbus", bus_seconds, bus_cpu),
            ("all", all_seconds, all_cpu),
        ]
        if args.trackers:
            tracked_seconds, _, _, tracked_cpu = anyio.run(
                all_subscribers_run, spec, data_dir, with_trackers, mlflow_uri
            )
            runs.append(("trackers", tracked_seconds, tracked_cpu))
            print(
                f"round {round_ + 1}: with the three trackers {tracked_seconds:.3f} s "
                f"({tracked_cpu:.3f} s CPU), over all subscribers "
                f"{tracked_seconds / all_seconds:.3f}"
            )
        for name, wall, cpu in runs:
            walls[name].append(wall)
            cpus[name].append(cpu)
        if client is not None:
            whole["bare_process"].append(bare_process(spec, args.threads))
            whole["job"].append(job_run(client, job_body))
            print(
                f"round {round_ + 1}: bare loop in its own process {whole['bare_process'][-1]:.3f}"
                f" s, the job through a server {whole['job'][-1]:.3f} s, ratio "
                f"{whole['job'][-1] / whole['bare_process'][-1]:.3f}"
            )
        print(
            f"round {round_ + 1}: bare {bare_seconds:.3f} s ({bare_cpu:.3f} s CPU)  "
            f"trainbus {bus_seconds:.3f} s ({bus_cpu:.3f} s CPU, {events} events to 4 lossless "
            f"subscribers)  all subscribers {all_seconds:.3f} s ({all_cpu:.3f} s CPU, "
            f"{all_events} events)  ratios {bus_seconds / bare_seconds:.3f} "
            f"{all_seconds / bare_seconds:.3f}"
        )
    # The fastest round of each is the least disturbed by whatever else the machine runs
    # (other processes only ever add time); the median of the paired ratios is shown too.
    fastest = {name: min(times) for name, times in walls.items() if times}
    least_cpu = {name: min(times) for name, times in cpus.items() if times}

    def paired(name: str) -> float:
        return statistics.median(b / a for a, b in zip(walls["bare"], walls[name], strict=True))

    print(
        f"fastest: bare {fastest['bare']:.3f} s, trainbus {fastest['trainbus']:.3f} s, all "
        f"subscribers {fastest['all']:.3f} s for {samples} samples; median of paired ratios "
        f"{paired('trainbus'):.3f} and {paired('all'):.3f}; CPU time (all threads) ratios "
        f"{least_cpu['trainbus'] / least_cpu['bare']:.3f} and "
        f"{least_cpu['all'] / least_cpu['bare']:.3f}"
    )
    # The same figures as absolute costs, which carry over to other workloads: trainbus's per
    # step (the bus and four lossless subscribers), and every default subscriber's per epoch
    # (a checkpoint, the controllers' decision, a scrape, plus the store's and exporter's share
    # of the epoch's batch events).
    steps = args.epochs * math.ceil(samples // args.epochs / args.batch_size)
    per_step_us = (fastest["trainbus"] - fastest["bare"]) / steps * 1e6
    per_epoch_ms = (fastest["all"] - fastest["bare"]) / args.epochs * 1e3
    print(
        f"trainbus adds {per_step_us:.1f} us per step ({steps} steps); every default subscriber "
        f"adds {per_epoch_ms:.1f} ms per epoch ({steps // args.epochs} steps an epoch)"
    )
    breakdown = _breakdown(spec, data_dir, args.rounds, walls["bare"]) if args.breakdown else {}
    trackers: dict[str, float] = {}
    if args.trackers:
        trackers = {
            "ratio_all_subscribers_and_trackers": round(fastest["trackers"] / fastest["bare"], 3),
            "ratio_trackers": round(fastest["trackers"] / fastest["all"], 3),
            "ratio_trackers_paired_median": round(
                statistics.median(
                    t / a for a, t in zip(walls["all"], walls["trackers"], strict=True)
                ),
                3,
            ),
            "cpu_ratio_trackers": round(least_cpu["trackers"] / least_cpu["all"], 3),
        }
        print(
            f"with the three trackers: {fastest['trackers']:.3f} s fastest, "
            f"{trackers['ratio_trackers']:.3f} of all subscribers' (median of paired ratios "
            f"{trackers['ratio_trackers_paired_median']:.3f})"
        )
    whole_path: dict[str, float] = {}
    if client is not None:
        whole_path = {
            "ratio_whole_path": round(min(whole["job"]) / min(whole["bare_process"]), 3),
            "ratio_whole_path_paired_median": round(
                statistics.median(
                    j / b for b, j in zip(whole["bare_process"], whole["job"], strict=True)
                ),
                3,
            ),
            "whole_path_job_s": round(min(whole["job"]), 3),
            "whole_path_bare_process_s": round(min(whole["bare_process"]), 3),
        }
        print(
            f"whole path: the job {whole_path['whole_path_job_s']:.3f} s against the bare loop "
            f"in its own process {whole_path['whole_path_bare_process_s']:.3f} s (fastest of "
            f"each), ratio {whole_path['ratio_whole_path']:.3f}"
        )
    print(
        json.dumps(
            {
                "bench": "overhead",
                "workload": {
                    "name": args.workload,
                    "samples": args.samples,
                    "epochs": args.epochs,
                    "batch_size": args.batch_size,
                    "hidden": args.hidden,
                    "torch_threads": args.threads,
                },
                "bare_samples_per_s": round(samples / fastest["bare"]),
                "trainbus_samples_per_s": round(samples / fastest["trainbus"]),
                "all_subscribers_samples_per_s": round(samples / fastest["all"]),
                "ratio": round(fastest["trainbus"] / fastest["bare"], 3),
                "ratio_all_subscribers": round(fastest["all"] / fastest["bare"], 3),
                "cpu_ratio": round(least_cpu["trainbus"] / least_cpu["bare"], 3),
                "cpu_ratio_all_subscribers": round(least_cpu["all"] / least_cpu["bare"], 3),
                "trainbus_us_per_step": round(per_step_us, 2),
                "all_subscribers_ms_per_epoch": round(per_epoch_ms, 2),
                **whole_path,
                **trackers,
                **({"breakdown": breakdown} if breakdown else {}),
            }
        )
    )


def _breakdown(
    spec: JobSpec, data_dir: Path, rounds: int, bare_walls: list[float]
) -> dict[str, float]:
    """Each default subscriber alone: its run's fastest time over the bare loop's (another
    round of bare runs alternates with them, so that both see the same machine)."""
    walls: dict[str, list[float]] = {part: [] for part in PARTS}
    bare = list(bare_walls)
    for _ in range(rounds):
        bare.append(bare_loop(spec, data_dir)[0])
        for part in PARTS:
            walls[part].append(anyio.run(all_subscribers_run, spec, data_dir, (part,))[0])
    ratios = {part: round(min(times) / min(bare), 3) for part, times in walls.items()}
    print("each default subscriber alone (fastest over fastest bare):", ratios)
    return ratios


if __name__ == "__main__":
    main()
