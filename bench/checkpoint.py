"""Checkpoint stall: what the training thread waits for, CheckpointWriter vs torch.save.

A model of 50.3 million parameters (three 4096x4096 linear layers) with its Adam state
(about 600 MB in all). In the same run and the same folder, each repetition measures:

- ``sync_save``: a plain synchronous ``torch.save`` of the trainer state (what a training
  loop without a background writer waits for; no fsync, so this baseline is flattering);
- ``stall``: the ``on_model_save`` callback of :class:`trainbus.subscribers.CheckpointWriter`
  (decide, snapshot the state into CPU memory, queue it); the durable write (fsync, manifest,
  rename, pointer) then runs on the writer's thread and is reported as ``background_write``.

Training steps run between checkpoints. The first writer snapshot allocates its buffers;
later ones copy into the buffers of the previous one, as in a real run. Medians are
reported. Last line: one JSON object.
"""

from __future__ import annotations

# isort: split

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from trainbus.subscribers import CheckpointWriter

WIDTH = 4096
LAYERS = 3


class BenchTrainer:
    """Just enough of a trainer for the writer: a big model, Adam, state_dict."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.job_id = "bench"
        self.epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.save_reason: str | None = None
        self.model = torch.nn.Sequential(*[torch.nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.inputs = torch.randn(8, WIDTH)
        self.callbacks: list[Any] = []

    def add_callback(self, name: str, fn: Any) -> None:
        if name == "on_model_save":
            self.callbacks.append(fn)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def train_step(self) -> None:
        loss = self.model(self.inputs).square().mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.metrics = {"train_loss": loss.item(), "val_loss": loss.item()}

    def end_epoch(self) -> float:
        """Run the on_model_save callbacks as the trainer does; return the seconds taken."""
        self.save_reason = "epoch_end"
        started = time.perf_counter()
        for callback in self.callbacks:
            callback(self)
        elapsed = time.perf_counter() - started
        self.save_reason = None
        self.epoch += 1
        return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repetitions", type=int, default=4)
    parser.add_argument("--folder", type=Path, default=None, help="default: a temporary one")
    args = parser.parse_args()

    trainer = BenchTrainer()
    parameters = sum(p.numel() for p in trainer.model.parameters())
    trainer.train_step()  # Adam's state exists from the first step on
    state_bytes = sum(
        t.numel() * t.element_size()
        for t in [
            *trainer.model.state_dict().values(),
            *(v for s in trainer.optimizer.state.values() for v in s.values()),
        ]
        if isinstance(t, torch.Tensor)
    )
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        job_dir = Path(folder) / "jobs" / "bench"
        job_dir.mkdir(parents=True)
        writer = CheckpointWriter(
            job_id="bench", job_dir=job_dir, bus=None, keep_last=1, keep_best=0
        )
        writer.bind(trainer)  # type: ignore[arg-type]
        sync, stalls, writes = [], [], []
        for repetition in range(args.repetitions):
            trainer.train_step()
            target = job_dir / f"sync-{repetition}.pt"
            started = time.perf_counter()
            torch.save(trainer.state_dict(), target)
            sync.append(time.perf_counter() - started)
            target.unlink()

            trainer.train_step()
            stalls.append(trainer.end_epoch())
            started = time.perf_counter()
            writer.flush()
            writes.append(time.perf_counter() - started + stalls[-1])
        writer.close()
        assert writer.statistics().written == args.repetitions

    stall, sync_save = statistics.median(stalls), statistics.median(sync)
    print(
        f"model: {parameters / 1e6:.1f} M parameters, state {state_bytes / 1e6:.0f} MB "
        f"(weights + Adam), {args.repetitions} repetitions, torch {torch.__version__}"
    )
    print(f"{'':<34}{'median s':>10}{'min s':>10}{'max s':>10}")
    for name, values in [
        ("sync torch.save (training waits)", sync),
        ("CheckpointWriter stall", stalls),
        ("  background durable write", writes),
    ]:
        print(
            f"{name:<34}{statistics.median(values):>10.3f}{min(values):>10.3f}{max(values):>10.3f}"
        )
    print(f"first writer stall (allocates the snapshot buffers): {stalls[0]:.3f} s")
    print(
        json.dumps(
            {
                "bench": "checkpoint",
                "stall_s": round(stall, 4),
                "sync_save_s": round(sync_save, 4),
                "ratio": round(stall / sync_save, 3),
                "parameters": parameters,
                "state_bytes": state_bytes,
                "background_write_s": round(statistics.median(writes), 4),
            }
        )
    )


if __name__ == "__main__":
    main()
