"""trainbus beside its peers: the same workload (model, data, batch order, validation each
epoch) as a bare hand-written loop, a built-in trainbus job (the trainer with four lossless
subscribers, as in ``bench/overhead.py``), Lightning alone, and Lightning with
:class:`trainbus.sdk.lightning.TrainbusCallback` reporting to a real ``trainbus serve`` on
loopback. The four alternate, round after round, in one process.

Last line: one JSON object; each ``*_ratio`` is that run's median wall time over the bare
loop's (1.00 = as fast as the bare loop); ``callback_cost`` is
``lightning_with_trainbus_ratio / lightning_ratio`` (1.00 = the callback costs nothing).
"""

from __future__ import annotations

# isort: split

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from trainbus.sdk.lightning import TrainbusCallback
from trainbus.worker import JobSpec, default_registry

sys.path.append(str(Path(__file__).resolve().parent))  # last: ``bus`` is imported already
from _server import serve
from overhead import WORKLOADS, bare_loop, make_spec, trainbus_run

TOKEN = "bench-peers-token-0123456789"


class Batches(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Returns a whole batch per index list: the bare loop's tensor indexing, no collate."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class EpochOrder(Sampler[torch.Tensor]):
    """The bare loop's batch order: a seeded permutation per epoch, cut into batches."""

    def __init__(self, size: int, batch_size: int, seed: int, shuffle: bool) -> None:
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:  # Lightning calls it before each epoch
        self.epoch = epoch

    def __iter__(self) -> Iterator[torch.Tensor]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.size, generator=generator)
        else:
            order = torch.arange(self.size)
        return iter(order.split(self.batch_size))

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)


class Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = torch.nn.CrossEntropyLoss()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        loss = self.loss_fn(self.model(inputs), targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(targets))
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, targets = batch
        outputs = self.model(inputs)
        self.log("val_loss", self.loss_fn(outputs, targets), batch_size=len(targets))
        accuracy = (outputs.argmax(1) == targets).float().mean()
        self.log("val_accuracy", accuracy, batch_size=len(targets))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def lightning_run(spec: JobSpec, data_dir: Path, callback: pl.Callback | None) -> float:
    entry = default_registry().dataset(spec.dataset.name)
    data = entry.load(entry.params.model_validate(spec.dataset.params), spec.seed, 0.2, data_dir)
    torch.manual_seed(spec.seed)
    model_entry = default_registry().model(spec.model.name)
    model = model_entry.build(
        model_entry.params.model_validate(spec.model.params), data.num_features, data.output_size
    )
    train = DataLoader(
        Batches(data.x_train, data.y_train),
        batch_size=None,
        sampler=EpochOrder(len(data.y_train), spec.batch_size, spec.seed, shuffle=True),
    )
    val = DataLoader(
        Batches(data.x_val, data.y_val),
        batch_size=None,
        sampler=EpochOrder(len(data.y_val), spec.batch_size, spec.seed, shuffle=False),
    )
    trainer = pl.Trainer(
        max_epochs=spec.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[] if callback is None else [callback],
        default_root_dir=str(data_dir / "lightning"),
    )
    started = time.perf_counter()
    trainer.fit(Module(model), train, val)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # epochs of about half a second, eight of them: a run of several seconds, so that the
    # callback's fixed cost (attaching, and the end waiting for the server to store every
    # event: about 0.15 s) weighs as it does in a real run, not as a per-step cost
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="realistic")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier timing)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for key, value in WORKLOADS[args.workload].items():
        setattr(args, key, value)
    spec = make_spec(args)
    times: dict[str, list[float]] = {"bare": [], "trainbus": [], "lightning": [],
                                     "lightning_with_trainbus": []}  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        data_dir = Path(folder)
        server, url = serve(data_dir, TOKEN)
        try:
            lightning_run(spec, data_dir, None)  # warm-up: imports, first allocations
            for round_ in range(args.rounds):
                times["bare"].append(bare_loop(spec, data_dir)[0])
                times["trainbus"].append(anyio.run(trainbus_run, spec, data_dir)[0])
                times["lightning"].append(lightning_run(spec, data_dir, None))
                callback = TrainbusCallback(f"peers-{os.getpid()}-{round_}", url=url, token=TOKEN)
                times["lightning_with_trainbus"].append(lightning_run(spec, data_dir, callback))
                print({k: round(v[-1], 3) for k, v in times.items()}, file=sys.stderr)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratios = {f"{name}_ratio": round(median[name] / median["bare"], 4) for name in median}
    del ratios["bare_ratio"]
    result = {
        "bench": "peers",
        **ratios,
        "callback_cost": round(median["lightning_with_trainbus"] / median["lightning"], 4),
        "workload": args.workload,
        "epochs": args.epochs,
        "rounds": args.rounds,
        "bare_seconds": round(median["bare"], 3),
        "seconds": {name: [round(t, 3) for t in values] for name, values in times.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
