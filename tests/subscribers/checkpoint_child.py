"""Child side of the SIGKILL test: a zygote that forks writers of checkpoints on demand.

Run as ``python checkpoint_child.py JOB_DIR``. For each line on stdin it forks a child that
loads the newest valid checkpoint and then writes checkpoints in a loop, printing
``started PID`` once and ``committed PID NAME STEP`` after each durable write; the zygote
prints ``exited PID STATUS`` when the child is gone (the test kills it with SIGKILL).
Importing torch once in the zygote keeps each of the many kills cheap.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

from trainbus.subscribers import CheckpointWriter, latest_valid_state


def _say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: lines never interleave


class _Trainer:
    def __init__(self) -> None:
        self.job_id = "kill"
        self.epoch = 0
        self.step = 0
        self.metrics: dict[str, float] = {}
        self.save_reason: str | None = None
        self.weights = torch.zeros(128, 128)
        self.moments = torch.zeros(2, 128, 128)
        self.callbacks: list[Any] = []

    def add_callback(self, name: str, fn: Any) -> None:
        if name == "on_model_save":
            self.callbacks.append(fn)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "weights": self.weights, "moments": self.moments}


def _write_forever(job_dir: Path) -> None:
    torch.set_num_threads(1)
    writer = CheckpointWriter(job_id="kill", job_dir=job_dir, bus=None, keep_last=2, keep_best=1)
    trainer = _Trainer()
    state = latest_valid_state("kill", job_dir)
    if state is not None:
        trainer.step = int(state["step"])
    writer.bind(trainer)  # type: ignore[arg-type]
    _say(f"started {os.getpid()}")
    generator = torch.Generator().manual_seed(os.getpid())
    while True:
        trainer.step += 1
        trainer.epoch = trainer.step
        trainer.weights.fill_(trainer.step)
        trainer.moments.fill_(-trainer.step)
        trainer.metrics = {"val_loss": float(torch.rand(1, generator=generator))}
        trainer.save_reason = "epoch_end"
        for callback in trainer.callbacks:
            callback(trainer)
        writer.flush()
        _say(f"committed {os.getpid()} {writer.statistics().last_checkpoint} {trainer.step}")


def main() -> None:
    job_dir = Path(sys.argv[1])
    for _ in sys.stdin:
        pid = os.fork()
        if pid == 0:
            try:
                _write_forever(job_dir)
            finally:
                os._exit(1)
        _, status = os.waitpid(pid, 0)
        _say(f"exited {pid} {status}")


if __name__ == "__main__":
    main()
