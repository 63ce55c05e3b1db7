"""Distributed training: a 2-rank data-parallel job through a real ``trainbus serve`` (the
built-in trainer, ``"distributed": {"nproc_per_node": 2, "backend": "gloo"}``, one torch
thread a rank) against the same training written as a plain script under bare ``torchrun
--standalone --nproc-per-node 2`` (``bench/_ddp_bare.py``), alternated for ``--rounds``.

Both train the same model on the same data: each rank its shard of the same seeded epoch
order, the same batches, gradients averaged over the ranks, the epoch's loss all-reduced and
the whole validation split on every rank each epoch. The job's time is its ``train_start`` to
its ``train_end``; the script's is its training loop's wall time measured inside rank 0.
Neither counts process start, imports, data or model building. The job keeps its default
subscribers but writes no checkpoints (the script writes none).

What differs is what trainbus does and a user's script would not, plus one choice of means:
the script uses torch's ``DistributedDataParallel`` as a user would, which all-reduces the
gradients in buckets overlapped with backward, while trainbus all-reduces its buckets once
backward has ended, and agrees on pending commands with a one-integer broadcast each step
(``worker/_agreement.py``). Rank 0 also publishes the
job's batch events to the server. So the ratio is trainbus's distributed job against what a
user writes with DDP, not against an identical gradient exchange.

With ``--breakdown`` each round also runs the script with trainbus's own exchange (every
gradient of this model in one all-reduce after backward and the step's broadcast,
``coalesced``), to tell the cost of the exchange from the cost of the rest of trainbus, and
with one all-reduce a parameter, each waiting as backward accumulates it (``per-parameter``),
to show what the number of collectives a step costs.

Last line: one JSON object; ``ratio`` is the job's median time over the DDP script's median
(1.00 = free), ``ratio_paired`` the median of each round's ratio; with ``--breakdown``,
``ratio_same_exchange`` is the job over the ``coalesced`` script, and
``per_parameter_over_ddp`` and ``coalesced_over_ddp`` each exchange over DDP.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx

sys.path.append(str(Path(__file__).resolve().parent))
import overhead
from _server import serve, train_job

TOKEN = "bench-distributed-token-0123456789"
RANKS = 2
BARE_SCRIPT = Path(__file__).resolve().parent / "_ddp_bare.py"


def make_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The realistic workload of ``bench/overhead.py`` (MLP 32-1024-10, batch 256), its
    samples split between the ranks."""
    body = overhead.make_spec(args).model_dump(mode="json")
    body["torch_threads"] = RANKS  # split between the ranks: one each
    body["distributed"] = {"nproc_per_node": RANKS, "backend": "gloo"}
    return body


def job_run(client: httpx.Client, body: dict[str, Any]) -> tuple[float, int]:
    """Train ``body`` as a job through the server: its training seconds and optimizer steps."""
    seconds, started = train_job(client, body)
    return seconds, int(started["data"]["batches_per_epoch"] * body["epochs"])


def bare_run(body: dict[str, Any], exchange: str = "ddp") -> float:
    """The script under bare torchrun with its gradient ``exchange``: rank 0's training loop
    time."""
    torchrun = Path(sys.executable).parent / "torchrun"
    process = subprocess.Popen(
        [str(torchrun), "--standalone", "--nproc-per-node", str(RANKS), str(BARE_SCRIPT),
         json.dumps({**body, "torch_threads": 1}), exchange],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its ranks with it, should it hang
    )  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise SystemExit("the bare script did not end in 600 s") from None
    if process.returncode != 0:
        raise SystemExit(f"the bare script failed:\n{stderr[-4000:]}")
    return float(json.loads(stdout.strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument(
        "--samples", type=int, default=128_000, help="all ranks together (default: 64,000 each)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="also run the script with trainbus's own gradient exchange (one coalesced "
        "all-reduce after backward, a broadcast each step) and with one all-reduce a parameter",
    )
    args = parser.parse_args()
    body = make_spec(args)
    names = ["trainbus", "ddp"] + (["coalesced", "per-parameter"] if args.breakdown else [])
    times: dict[str, list[float]] = {name: [] for name in names}
    steps = 0
    with tempfile.TemporaryDirectory(prefix="trainbus-bench-") as folder:
        # one CPU slot a rank
        server, url = serve(Path(folder), TOKEN, {"TRAINBUS_MAX_RUNNING_JOBS": str(RANKS)})
        try:
            with httpx.Client(
                base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=60
            ) as client:
                job_run(client, {**body, "epochs": 1})  # warm: the fork server imports torch
                print("round " + " ".join(f"{name + ' s':>15}" for name in names) + "  ratio")
                for round_index in range(args.rounds):
                    shift = round_index % len(names)  # each goes first in turn
                    for name in names[shift:] + names[:shift]:
                        if name == "trainbus":
                            seconds, steps = job_run(client, body)
                        else:
                            seconds = bare_run(body, name)
                        times[name].append(seconds)
                    row = " ".join(f"{times[name][-1]:>15.3f}" for name in names)
                    ratio = times["trainbus"][-1] / times["ddp"][-1]
                    print(f"{round_index:>5} {row} {ratio:>6.3f}", flush=True)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)
    medians = {name: statistics.median(runs) for name, runs in times.items()}
    paired = statistics.median(t / b for t, b in zip(times["trainbus"], times["ddp"], strict=True))
    result: dict[str, Any] = {
        "bench": "distributed",
        "ratio": round(medians["trainbus"] / medians["ddp"], 3),
        "ratio_paired": round(paired, 3),
        "trainbus_s": round(medians["trainbus"], 3),
        "bare_s": round(medians["ddp"], 3),
        "per_step_overhead_ms": round((medians["trainbus"] - medians["ddp"]) / steps * 1000, 3),
    }
    if args.breakdown:
        # the job against the script with the job's own exchange: what trainbus adds beyond it
        result["ratio_same_exchange"] = round(medians["trainbus"] / medians["coalesced"], 3)
        result["per_parameter_over_ddp"] = round(medians["per-parameter"] / medians["ddp"], 3)
        result["coalesced_over_ddp"] = round(medians["coalesced"] / medians["ddp"], 3)
    result.update(
        ranks=RANKS,
        rounds=args.rounds,
        epochs=args.epochs,
        steps=steps,
        runs={name: [round(t, 3) for t in runs] for name, runs in times.items()},
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
