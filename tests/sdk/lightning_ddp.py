"""A Lightning fit with ``strategy="ddp"`` on two CPU processes, reported by the
``TrainbusCallback``: Lightning starts the second process itself (it runs this script again).
Each rank prints, as its last line, where it ended: ``{"rank", "step", "epoch", "stopped"}``.

    python tests/sdk/lightning_ddp.py --run-id RUN [--epochs N] [--stop-at-accuracy A]
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus.sdk.lightning import TrainbusCallback


class Digits(pl.LightningModule):
    def __init__(self, batch_seconds: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.loss_fn = nn.CrossEntropyLoss()
        self.batch_seconds = batch_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        time.sleep(self.batch_seconds)
        return self.loss_fn(self.net(inputs), targets)  # type: ignore[no-any-return]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        logits = self.net(inputs)
        self.log("val_loss", self.loss_fn(logits, targets), sync_dist=True)
        accuracy = (logits.argmax(1) == targets).float().mean()
        self.log("val_accuracy", accuracy, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0)
    parser.add_argument("--stop-at-accuracy", type=float)
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=32)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=512)
    torch.manual_seed(0)
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip
    callback = TrainbusCallback(args.run_id, early_stop=early_stop)
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[callback], accelerator="cpu",
                         devices=2, strategy="ddp", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Digits(args.batch_seconds), train, val)
    ended = {"rank": trainer.global_rank, "step": trainer.global_step,
             "epoch": trainer.current_epoch, "stopped": trainer.should_stop}  # fmt: skip
    print(json.dumps(ended), flush=True)


if __name__ == "__main__":
    main()
