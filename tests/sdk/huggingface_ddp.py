"""A Hugging Face ``Trainer`` under ``torchrun`` (DDP over gloo, on the CPU), reported by the
``TrainbusCallback``: a small classifier built from its config (nothing is downloaded) on ten
classes of synthetic points around ten centres. Each rank prints, as its last line, where it
ended: ``{"rank", "step", "epoch", "stopped", "lr", "saved"}`` (``saved``: the steps at which
the Trainer wrote a checkpoint on this rank).

    torchrun --standalone --nproc-per-node 2 tests/sdk/huggingface_ddp.py --run-id RUN \\
        [--epochs N] [--batch-seconds S] [--stop-at-accuracy A]
"""

# ruff: noqa: E402
from __future__ import annotations

import gc

# importing transformers makes over half a million objects, and each collection of the oldest
# generation walks them all: seconds of a test on a busy machine; main freezes them once
gc.disable()

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    Trainer,
    TrainerCallback,
    TrainerControl,
    TrainerState,
    TrainingArguments,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from trainbus.sdk.huggingface import TrainbusCallback

FEATURES = 16
NOISE = 1.0
"""How far the points lie from their centre: the model needs a few epochs to tell them apart."""


class PointsConfig(PretrainedConfig):
    model_type = "points-mlp"

    def __init__(self, hidden_size: int = 32, **kwargs: Any) -> None:
        self.hidden_size = hidden_size
        super().__init__(**kwargs)


class PointsClassifier(PreTrainedModel):
    config_class = PointsConfig

    def __init__(self, config: PointsConfig) -> None:
        super().__init__(config)
        self.net = nn.Sequential(
            nn.Linear(FEATURES, config.hidden_size), nn.ReLU(), nn.Linear(config.hidden_size, 10)
        )
        self.post_init()

    def forward(
        self, points: torch.Tensor, labels: torch.Tensor | None = None
    ) -> SequenceClassifierOutput:
        logits = self.net(points)
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class Steps(TrainerCallback):
    """Slows each step, and keeps the steps at which the Trainer saved on this rank."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.saved: list[int] = []

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)

    def on_save(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        self.saved.append(state.global_step)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0)
    parser.add_argument("--stop-at-accuracy", type=float)
    args = parser.parse_args()
    gc.freeze()  # what the imports made stays: no collection walks it again, nor at exit
    gc.enable()
    torch.manual_seed(0)
    centres = torch.randn(10, FEATURES)
    labels = torch.randint(0, 10, (1000,))
    points = centres[labels] + NOISE * torch.randn(len(labels), FEATURES)
    rows = [{"points": p, "labels": int(label)} for p, label in zip(points, labels, strict=True)]
    model = PointsClassifier(PointsConfig())
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip

    def accuracy(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, 1)
        return {"accuracy": float((predicted == prediction.label_ids).mean())}

    steps = Steps(args.batch_seconds)
    with tempfile.TemporaryDirectory() as output:
        training = TrainingArguments(output_dir=output, num_train_epochs=args.epochs,
                                     per_device_train_batch_size=32, learning_rate=0.01,
                                     optim="adamw_torch", lr_scheduler_type="constant",
                                     logging_steps=1, eval_strategy="epoch", save_strategy="no",
                                     report_to=[], use_cpu=True, ddp_backend="gloo",
                                     ddp_find_unused_parameters=False,
                                     disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=model, args=training, train_dataset=rows[:800],
                          eval_dataset=rows[800:], compute_metrics=accuracy,
                          callbacks=[TrainbusCallback(args.run_id, early_stop=early_stop),
                                     steps])  # fmt: skip
        trainer.train()
        state, optimizer = trainer.state, trainer.optimizer
        assert optimizer is not None
        ended = {"rank": dist.get_rank(), "step": state.global_step, "epoch": state.epoch,
                 "stopped": trainer.control.should_training_stop,
                 "lr": optimizer.param_groups[0]["lr"], "saved": steps.saved}  # fmt: skip
        print(json.dumps(ended), flush=True)
        dist.barrier()  # no rank tears its gloo pair down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
