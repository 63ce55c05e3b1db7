"""A registered program: the operator's own plain training loop, which the server runs as a
job when a request names it (``{"program": {"name": "digits_loop", "params": {...}}}``).

The server calls ``train(run, params)`` in a worker process of the job, with ``run`` already
attached to it: the loop reports through ``run`` and obeys pause, resume, stop, save and
set_lr at the batch boundaries ``run.batches()`` gives it. What it prints becomes the job's
``log`` events and its log file (``GET /jobs/{id}/log``).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainbus.sdk import Run
from trainbus.worker import ProgramEntry

__all__ = ["DIGITS_LOOP", "DigitsLoopParams", "train_digits"]


class DigitsLoopParams(BaseModel):
    """What a request may set under ``program.params`` (validated at submission)."""

    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=10, ge=1, le=10_000)
    hidden: int = Field(default=64, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0, le=1)
    batch_size: int = Field(default=32, ge=1, le=1797)
    seed: int = Field(default=0, ge=0)


def train_digits(run: Run, params: DigitsLoopParams) -> None:
    """An MLP on scikit-learn's 8x8 digits (bundled with scikit-learn: nothing to download)."""
    from sklearn.datasets import load_digits

    torch.manual_seed(params.seed)
    features, targets = load_digits(return_X_y=True)
    inputs = torch.tensor(features / 16.0, dtype=torch.float32)
    labels = torch.tensor(targets)
    order = torch.randperm(len(inputs))
    train_rows, val_rows = order[:1400], order[1400:]
    model = nn.Sequential(nn.Linear(64, params.hidden), nn.ReLU(), nn.Linear(params.hidden, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    run.watch(model, optimizer)  # checkpoints on pause and save; set_lr reaches the optimizer
    run.total_epochs = params.epochs
    loss_function = nn.CrossEntropyLoss()
    for epoch in run.epochs():
        model.train()
        shuffled = train_rows[torch.randperm(len(train_rows))]
        batches = [
            shuffled[i : i + params.batch_size] for i in range(0, len(shuffled), params.batch_size)
        ]
        total = 0.0
        for rows in run.batches(batches):
            optimizer.zero_grad()
            loss = loss_function(model(inputs[rows]), labels[rows])
            loss.backward()
            optimizer.step()
            run.log_batch(loss, batch_size=len(rows))
            total += float(loss) * len(rows)
        model.eval()
        with torch.no_grad():
            logits = model(inputs[val_rows])
            val_loss = float(loss_function(logits, labels[val_rows]))
            val_accuracy = float((logits.argmax(1) == labels[val_rows]).float().mean())
        train_loss = total / len(train_rows)
        print(f"epoch {epoch}: train_loss {train_loss:.4f} val_accuracy {val_accuracy:.3f}")
        run.end_epoch(train_loss=train_loss, val_loss=val_loss, val_accuracy=val_accuracy)


DIGITS_LOOP = ProgramEntry(
    "digits_loop",
    DigitsLoopParams,
    train_digits,
    "A plain PyTorch loop: an MLP on scikit-learn's digits, reporting through the SDK.",
)
