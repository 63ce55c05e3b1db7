"""Training overhead: the same work as a bare hand-written torch loop and as a trainbus job
that publishes every batch event to four lossless subscribers, alternated in one process.

Last line: one JSON object; ``ratio`` is trainbus wall time over bare wall time (1.00 = free).
"""

from __future__ import annotations

import _no_shadow  # noqa: F401  (must come first: bench/bus.py shadows the bus package)

# isort: split

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import anyio
import torch

from bus import ControlChannel, Event, EventBus, Subscriber
from worker import JobSpec, Trainer, default_registry


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
    """What a user writes by hand: shuffle, forward, backward, step, log the loss, validate."""
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
        with torch.no_grad():
            for start in range(0, len(data.y_val), batch_size):
                loss_fn(
                    model(data.x_val[start : start + batch_size]),
                    data.y_val[start : start + batch_size],
                ).item()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = make_spec(args)
    data_dir = Path(tempfile.mkdtemp(prefix="trainbus-bench-"))
    bare_loop(spec, data_dir)  # warm-up: caches, allocator, lazy imports
    anyio.run(trainbus_run, spec, data_dir)
    bare_times: list[float] = []
    bus_times: list[float] = []
    bare_cpus: list[float] = []
    bus_cpus: list[float] = []
    events = 0
    samples = 0
    for round_ in range(args.rounds):
        bare_seconds, samples, bare_cpu = bare_loop(spec, data_dir)
        bus_seconds, _, events, bus_cpu = anyio.run(trainbus_run, spec, data_dir)
        bare_times.append(bare_seconds)
        bus_times.append(bus_seconds)
        bare_cpus.append(bare_cpu)
        bus_cpus.append(bus_cpu)
        print(
            f"round {round_ + 1}: bare {bare_seconds:.3f} s ({bare_cpu:.3f} s CPU)  "
            f"trainbus {bus_seconds:.3f} s ({bus_cpu:.3f} s CPU)  "
            f"({events} events to 4 lossless subscribers)  ratio {bus_seconds / bare_seconds:.3f}"
        )
    # The fastest round of each is the least disturbed by whatever else the machine runs
    # (other processes only ever add time); the median of the paired ratios is shown too.
    bare = min(bare_times)
    with_bus = min(bus_times)
    paired = statistics.median(b / a for a, b in zip(bare_times, bus_times, strict=True))
    print(
        f"fastest: bare {bare:.3f} s, trainbus {with_bus:.3f} s for {samples} samples "
        f"({events} events per trainbus run); median of paired ratios {paired:.3f}; "
        f"CPU time (all threads) ratio {min(bus_cpus) / min(bare_cpus):.3f}"
    )
    print(
        json.dumps(
            {
                "bench": "overhead",
                "bare_samples_per_s": round(samples / bare),
                "trainbus_samples_per_s": round(samples / with_bus),
                "ratio": round(with_bus / bare, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
