"""A Hugging Face Trainer as a trainbus job: a tiny BERT, built from its config (nothing is
downloaded), classifying scikit-learn's digits read as sequences of 64 pixel tokens.

    TRAINBUS_URL=http://127.0.0.1:8000 TRAINBUS_TOKEN=... python examples/sdk_huggingface.py
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from trainbus.sdk.huggingface import TrainbusCallback


class SlowSteps(TrainerCallback):
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, *args: Any, **kwargs: Any) -> None:
        time.sleep(self.seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", default="digits-huggingface")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="slow each step")
    parser.add_argument("--stop-at-accuracy", type=float, help="early stop on val_accuracy")
    args = parser.parse_args()
    x, y = load_digits(return_X_y=True)
    tokens = torch.tensor(x, dtype=torch.long)  # pixel values 0..16 as token ids
    rows = [{"input_ids": t, "labels": int(label)} for t, label in zip(tokens, y, strict=True)]
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=17,  # pixel values 0..16
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=10,
    )
    model = BertForSequenceClassification(config)
    early_stop = None
    if args.stop_at_accuracy is not None:
        early_stop = {"enabled": True, "monitor": "val_accuracy", "mode": "max", "patience": 50,
                      "stopping_threshold": args.stop_at_accuracy}  # fmt: skip

    def accuracy(prediction: Any) -> dict[str, float]:
        predicted = np.argmax(prediction.predictions, 1)
        return {"accuracy": float((predicted == prediction.label_ids).mean())}

    with tempfile.TemporaryDirectory() as output:
        training = TrainingArguments(output_dir=output, num_train_epochs=args.epochs,
                                     per_device_train_batch_size=64, learning_rate=3e-3,
                                     logging_steps=1, eval_strategy="epoch", save_strategy="no",
                                     report_to=[], use_cpu=True, disable_tqdm=True)  # fmt: skip
        # the trainbus part: one callback
        callbacks = [TrainbusCallback(args.run_id, early_stop=early_stop, config={"lr": 3e-3}),
                     SlowSteps(args.batch_seconds)]  # fmt: skip
        Trainer(model=model, args=training, train_dataset=rows[:1400], eval_dataset=rows[1400:],
                compute_metrics=accuracy, callbacks=callbacks).train()  # fmt: skip


if __name__ == "__main__":
    main()
