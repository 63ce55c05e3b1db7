"""A user's own training loop, as the SDK's tests run it: an MLP on scikit-learn's digits
(bundled with scikit-learn, nothing downloaded), written the way people write loops."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from sklearn.datasets import load_digits
from torch import nn

from trainbus.sdk import Run

BATCH_SIZE = 64


@dataclass
class Digits:
    train: list[tuple[torch.Tensor, torch.Tensor]]
    x_val: torch.Tensor
    y_val: torch.Tensor


def digits(seed: int = 0) -> Digits:
    x, y = load_digits(return_X_y=True)
    x_all = torch.tensor(x / 16.0, dtype=torch.float32)
    y_all = torch.tensor(y, dtype=torch.long)
    order = torch.randperm(len(y_all), generator=torch.Generator().manual_seed(seed))
    x_all, y_all = x_all[order], y_all[order]
    split = int(0.8 * len(y_all))
    batches = [
        (x_all[i : i + BATCH_SIZE], y_all[i : i + BATCH_SIZE]) for i in range(0, split, BATCH_SIZE)
    ]
    return Digits(batches, x_all[split:], y_all[split:])


def model_and_optimizer(seed: int = 0, lr: float = 0.05) -> tuple[nn.Module, torch.optim.SGD]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    return model, torch.optim.SGD(model.parameters(), lr=lr)


@dataclass
class Trained:
    epochs: list[int] = field(default_factory=list)
    batches: int = 0


def train(
    run: Run,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: Digits,
    *,
    batch_seconds: float = 0.0,
    val_loss: Callable[[int, float], float] | None = None,
    after_epoch: Callable[[int], Any] | None = None,
) -> Trained:
    """The user's loop, with the SDK's three additions: ``run.epochs()``,
    ``run.batches(...)`` with ``run.log_batch(loss)``, and ``run.end_epoch(...)``."""
    trained = Trained()
    loss_fn = nn.CrossEntropyLoss()
    for epoch in run.epochs():
        model.train()
        total = 0.0
        for x, y in run.batches(data.train):
            optimizer.zero_grad()
            loss = loss_fn(model(x), y)
            loss.backward()
            optimizer.step()
            run.log_batch(loss, batch_size=len(y))
            total += loss.item() * len(y)
            trained.batches += 1
            if batch_seconds:
                time.sleep(batch_seconds)
        model.eval()
        with torch.no_grad():
            logits = model(data.x_val)
            measured = float(loss_fn(logits, data.y_val))
            accuracy = float((logits.argmax(1) == data.y_val).float().mean())
        reported = val_loss(epoch, measured) if val_loss is not None else measured
        run.end_epoch(
            train_loss=total / sum(len(y) for _, y in data.train),
            val_loss=reported,
            val_accuracy=accuracy,
        )
        trained.epochs.append(epoch)
        if after_epoch is not None:
            after_epoch(epoch)
    return trained
