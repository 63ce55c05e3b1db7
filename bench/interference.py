"""How much work on the *other* core slows a training loop on this machine.

The bare loop of ``bench/overhead.py`` runs alone, and while a separate process (no shared
GIL, no shared memory) keeps the other core busy for a fraction of each 10 ms, alternately in
one process. On a machine whose cores are independent every ratio stays near 1.00; on a VM
whose virtual cores share a physical core or a power budget, concurrent work anywhere costs
the training step time. That is the floor under any subscriber work done next to training,
in this process or another (see ``ratio_all_subscribers`` in ``bench/overhead.py``).

Last line: one JSON object; ``ratios`` maps each duty (the busy share of the other core) to
the median of the paired ratios (loop time with the load over the loop time without it, in
the same round), ``fastest_ratios`` to the fastest run's over the fastest unloaded run's.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from overhead import WORKLOADS, bare_loop, make_spec

PERIOD_S = 0.010
LOAD = """
import sys, time
busy, idle = float(sys.argv[1]), float(sys.argv[2])
while True:
    end = time.perf_counter() + busy
    while time.perf_counter() < end:
        pass
    if idle:
        time.sleep(idle)
"""


def start_load(duty: float) -> subprocess.Popen[bytes]:
    """A process that spins for ``duty`` of every 10 ms, on the other core where it can."""
    command = [sys.executable, "-c", LOAD, str(PERIOD_S * duty), str(PERIOD_S * (1 - duty))]
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) > 1 and shutil.which("taskset"):
        command = ["taskset", "-c", str(cores[-1]), *command]
    load = subprocess.Popen(command)
    time.sleep(0.2)  # let it start spinning
    return load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=20_000)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument(
        "--duties",
        type=float,
        nargs="+",
        default=[0.1, 0.25, 1.0],
        help="busy shares of the other core to try",
    )
    args = parser.parse_args()
    args.batch_size, args.hidden = WORKLOADS["tiny"]["batch_size"], WORKLOADS["tiny"]["hidden"]
    torch.set_num_threads(1)
    cores = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores[:1])  # the loop on the first core, the load on the last
    spec = make_spec(args)
    data_dir = Path(tempfile.mkdtemp(prefix="trainbus-bench-"))
    bare_loop(spec, data_dir)  # warm-up
    alone: list[float] = []
    loaded: dict[float, list[float]] = {duty: [] for duty in args.duties}
    for round_ in range(args.rounds):
        alone.append(bare_loop(spec, data_dir)[0])
        for duty in args.duties:
            load = start_load(duty)
            try:
                loaded[duty].append(bare_loop(spec, data_dir)[0])
            finally:
                load.kill()
                load.wait()
        print(
            f"round {round_ + 1}: alone {alone[-1]:.3f} s  "
            + "  ".join(f"{duty:.0%} {times[-1]:.3f} s" for duty, times in loaded.items())
        )
    ratios = {
        f"{duty:.2f}": round(statistics.median(b / a for a, b in zip(alone, times, strict=True)), 3)
        for duty, times in loaded.items()
    }
    fastest = {f"{duty:.2f}": round(min(times) / min(alone), 3) for duty, times in loaded.items()}
    print(f"median paired ratios by duty {ratios}; fastest over fastest {fastest}")
    print(
        json.dumps(
            {
                "bench": "interference",
                "cores": len(cores),
                "loop_alone_s": round(min(alone), 4),
                "ratios": ratios,
                "fastest_ratios": fastest,
            }
        )
    )


if __name__ == "__main__":
    main()
