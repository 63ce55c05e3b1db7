"""A plain PyTorch DDP loop as a trainbus job, under torchrun: an MLP on scikit-learn's digits.

    TRAINBUS_URL=http://127.0.0.1:8000 TRAINBUS_TOKEN=... \\
        torchrun --standalone --nproc-per-node 2 examples/sdk_ddp_loop.py

Every rank runs the same loop with the same trainbus calls: rank 0 reports the job, and every
rank obeys its pause, resume, stop, save and set_lr at the same step. Each rank prints, as its
last line, where it ended: ``{"rank", "step", "epoch", "stopped", "lr"}``.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import trainbus.sdk


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", default="digits-ddp-loop")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="slow each batch")
    parser.add_argument("--stop-at-accuracy", type=float, help="early stop on val_accuracy")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun gives each process its rank and the rendezvous
    rank, world_size = dist.get_rank(), dist.get_world_size()
    x, y = load_digits(return_X_y=True)
    x, y = torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)
    x_train, y_train = x[:1400][rank::world_size], y[:1400][rank::world_size]  # this rank's shard
    train = list(zip(x_train.split(32), y_train.split(32), strict=True))
    x_val, y_val = x[1400:], y[1400:]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.05)
    loss_fn = nn.CrossEntropyLoss()
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip

    # the trainbus part, the same on every rank: init, epochs(), batches(), log_batch(),
    # end_epoch()
    with trainbus.sdk.init(args.run_id, epochs=args.epochs, model=model, optimizer=optimizer,
                           config={"lr": 0.05, "ranks": world_size},
                           early_stop=early_stop) as run:  # fmt: skip
        for _epoch in run.epochs():
            for inputs, targets in run.batches(train):
                optimizer.zero_grad()
                loss = loss_fn(ddp(inputs), targets)
                loss.backward()  # DDP averages the gradients over the ranks
                optimizer.step()
                run.log_batch(loss)
                time.sleep(args.batch_seconds)
            with torch.no_grad():
                logits = model(x_val)
            run.end_epoch(
                val_loss=loss_fn(logits, y_val).item(),
                val_accuracy=(logits.argmax(1) == y_val).float().mean().item(),
            )
    ended = {"rank": rank, "step": run.step, "epoch": run.epoch, "stopped": run.should_stop,
             "lr": optimizer.param_groups[0]["lr"]}  # fmt: skip
    print(json.dumps(ended), flush=True)
    dist.barrier()  # no rank tears its gloo pair down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
