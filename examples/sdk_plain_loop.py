"""A plain PyTorch loop as a trainbus job: an MLP on scikit-learn's digits.

    TRAINBUS_URL=http://127.0.0.1:8000 TRAINBUS_TOKEN=... python examples/sdk_plain_loop.py

Pause, resume, stop, save and set_lr it from the API or the dashboard; run it again with the
same ``--run-id`` and it continues from its checkpoint.
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import trainbus.sdk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", default="digits-plain-loop")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="slow each batch")
    parser.add_argument("--stop-at-accuracy", type=float, help="early stop on val_accuracy")
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    train = list(zip(x[:1400].split(64), y[:1400].split(64), strict=True))
    x_val, y_val = x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip

    # the trainbus part: init, epochs(), batches(), log_batch(), end_epoch()
    config = {"lr": 0.05, "hidden": 64}
    with trainbus.sdk.init(args.run_id, epochs=args.epochs, model=model, optimizer=optimizer,
                           config=config, early_stop=early_stop) as run:  # fmt: skip
        for _epoch in run.epochs():
            for inputs, targets in run.batches(train):
                optimizer.zero_grad()
                loss = loss_fn(model(inputs), targets)
                loss.backward()
                optimizer.step()
                run.log_batch(loss)
                time.sleep(args.batch_seconds)
            with torch.no_grad():
                logits = model(x_val)
            run.end_epoch(
                val_loss=loss_fn(logits, y_val).item(),
                val_accuracy=(logits.argmax(1) == y_val).float().mean().item(),
            )


if __name__ == "__main__":
    main()
