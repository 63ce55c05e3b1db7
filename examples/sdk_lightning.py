"""A PyTorch Lightning fit as a trainbus job: an MLP on scikit-learn's digits.

    TRAINBUS_URL=http://127.0.0.1:8000 TRAINBUS_TOKEN=... python examples/sdk_lightning.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from trainbus.sdk.lightning import TrainbusCallback


class Digits(pl.LightningModule):
    def __init__(self, batch_seconds: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        self.loss_fn = nn.CrossEntropyLoss()
        self.batch_seconds = batch_seconds

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self.loss_fn(self.net(inputs), targets)
        self.log("train_loss", loss, on_epoch=True, on_step=False)
        time.sleep(self.batch_seconds)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        logits = self.net(inputs)
        self.log("val_loss", self.loss_fn(logits, targets))
        self.log("val_accuracy", (logits.argmax(1) == targets).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", default="digits-lightning")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="slow each batch")
    parser.add_argument("--stop-at-accuracy", type=float, help="early stop on val_accuracy")
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = DataLoader(TensorDataset(x[:1400], y[:1400]), batch_size=64)
    val = DataLoader(TensorDataset(x[1400:], y[1400:]), batch_size=512)
    torch.manual_seed(0)
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip

    # the trainbus part: one callback
    callback = TrainbusCallback(args.run_id, early_stop=early_stop, config={"lr": 0.05})
    trainer = pl.Trainer(max_epochs=args.epochs, callbacks=[callback], accelerator="cpu",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(Digits(args.batch_seconds), train, val)


if __name__ == "__main__":
    main()
