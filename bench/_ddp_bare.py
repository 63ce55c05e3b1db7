"""The distributed bench's bare side: a data-parallel training script as a user writes it,
run under ``torchrun --standalone --nproc-per-node N``. Arguments: the job spec as JSON (the
built-in model and dataset by name, so both sides train the same network on the same data),
and how the ranks exchange gradients:

- ``ddp`` (the default): torch's ``DistributedDataParallel``, as a user writes it;
- ``coalesced``: trainbus's own exchange without the rest of trainbus (``worker/_agreement.py``,
  for a model under its 25 MiB bucket): every gradient in one flat all-reduce after backward,
  and a one-integer broadcast from rank 0 at each batch boundary;
- ``per-parameter``: each parameter's gradient all-reduced as soon as backward has
  accumulated it, and the same broadcast.

Each rank trains on its shard of the seeded epoch order (padded from its start to a multiple
of the ranks, every ``world_size``-th index from the rank on, as ``DistributedSampler``
splits it), with torch's ``DistributedDataParallel`` averaging the gradients; the epoch's
loss is all-reduced and every rank validates on the whole validation split. Rank 0 prints,
as JSON, the training loop's wall time (process start, imports, data and model excluded).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch._dynamo  # as the fork server has it: the first optimizer step imports it
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainbus.worker import JobSpec, default_registry

EXCHANGES = ("ddp", "coalesced", "per-parameter")


def _average_each(model: nn.Module, world_size: int) -> None:
    def average(parameter: torch.Tensor) -> None:
        assert parameter.grad is not None
        dist.all_reduce(parameter.grad)
        parameter.grad.div_(world_size)

    for parameter in model.parameters():
        parameter.register_post_accumulate_grad_hook(average)  # type: ignore[no-untyped-call]


def _average_all(model: nn.Module, world_size: int) -> None:
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([gradient.reshape(-1) for gradient in gradients])
    dist.all_reduce(flat)
    flat.div_(world_size)
    offset = 0
    for gradient in gradients:
        gradient.copy_(flat[offset : offset + gradient.numel()].view_as(gradient))
        offset += gradient.numel()


def main() -> None:
    spec = JobSpec.model_validate_json(sys.argv[1])
    exchange = sys.argv[2] if len(sys.argv) > 2 else "ddp"
    if exchange not in EXCHANGES:
        raise SystemExit(f"exchange {exchange!r}: give one of {', '.join(EXCHANGES)}")
    torch.set_num_threads(spec.torch_threads or 1)
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    registry = default_registry()
    entry = registry.dataset(spec.dataset.name)
    with tempfile.TemporaryDirectory() as folder:  # synthetic data: nothing is downloaded
        data = entry.load(
            entry.params.model_validate(spec.dataset.params),
            spec.seed,
            spec.dataset.val_fraction,
            Path(folder),
        )
    torch.manual_seed(spec.seed)
    model_entry = registry.model(spec.model.name)
    model: nn.Module = model_entry.build(
        model_entry.params.model_validate(spec.model.params), data.num_features, data.output_size
    )
    if exchange == "ddp":
        model = DistributedDataParallel(model)  # its constructor gives every rank rank 0's weights
    else:
        with torch.no_grad():
            for tensor in model.state_dict().values():
                dist.broadcast(tensor, src=0)
        if exchange == "per-parameter":
            _average_each(model, world_size)
    pending = torch.zeros(1, dtype=torch.int64)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=spec.optimizer.lr, momentum=spec.optimizer.momentum
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    batch_size = spec.batch_size
    shard = -(-len(data.y_train) // world_size)
    dist.barrier()
    started = time.perf_counter()
    for epoch in range(spec.epochs):
        model.train()
        generator = torch.Generator().manual_seed(spec.seed * 1_000_003 + epoch)
        order = torch.randperm(len(data.y_train), generator=generator)
        padding = shard * world_size - len(order)
        if padding:
            order = torch.cat([order, order[:padding]])
        order = order[rank::world_size]
        loss_sum, seen = 0.0, 0
        for start in range(0, len(order), batch_size):
            if exchange != "ddp":  # whether rank 0 has a command (it never has one here)
                dist.broadcast(pending, src=0)
            index = order[start : start + batch_size]
            inputs, targets = data.x_train[index], data.y_train[index]
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            if exchange == "coalesced":
                _average_all(model, world_size)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.item() * len(targets)
            seen += len(targets)
        totals = torch.tensor([loss_sum, seen], dtype=torch.float64)
        dist.all_reduce(totals)  # the epoch's training loss over every rank's samples
        model.eval()
        with torch.no_grad():  # validation loss and accuracy on the whole split, every rank
            val_loss, correct = 0.0, 0
            for start in range(0, len(data.y_val), batch_size):
                outputs = model(data.x_val[start : start + batch_size])
                targets = data.y_val[start : start + batch_size]
                val_loss += loss_fn(outputs, targets).item() * len(targets)
                correct += int((outputs.argmax(1) == targets).sum())
    seconds = time.perf_counter() - started
    if rank == 0:
        print(json.dumps({"seconds": seconds, "train_loss": float(totals[0] / totals[1])}))
    sys.stdout.flush()
    # gloo's process group at interpreter exit now and then left both ranks waiting for good
    os._exit(0)


if __name__ == "__main__":
    main()
