"""An Ultralytics YOLO training as a trainbus job: a YOLOv8n, built from its config (no
weights), finding squares on generated 64 px images.

    TRAINBUS_URL=http://127.0.0.1:8000 TRAINBUS_TOKEN=... python examples/sdk_ultralytics.py

Runs offline: the images are drawn into a temporary folder, Ultralytics' settings and font
live in that folder too, and its own integrations (hub sync, trackers) are off. Needs
``pip install ultralytics`` (with the torchvision that matches your torch).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SIZE = 64


def write_dataset(folder: Path, train: int = 8, val: int = 4) -> Path:
    """Noise images, each with one bright square labelled class 0; returns the data YAML."""
    import cv2

    generator = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        images, labels = folder / "images" / split, folder / "labels" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for index in range(count):
            image = generator.integers(0, 80, (IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
            side = int(generator.integers(16, 32))
            x, y = (int(v) for v in generator.integers(0, IMAGE_SIZE - side, 2))
            image[y : y + side, x : x + side] = 230
            cv2.imwrite(str(images / f"{index}.png"), image)
            box = [(x + side / 2) / IMAGE_SIZE, (y + side / 2) / IMAGE_SIZE,
                   side / IMAGE_SIZE, side / IMAGE_SIZE]  # fmt: skip
            (labels / f"{index}.txt").write_text("0 " + " ".join(f"{v:.6f}" for v in box) + "\n")
    data = folder / "squares.yaml"
    data.write_text(f"path: {folder}\ntrain: images/train\nval: images/val\nnames:\n  0: square\n")
    return data


def offline_ultralytics(folder: Path) -> None:
    """Ultralytics' settings in ``folder``, a local font, no network (before its import)."""
    import matplotlib

    os.environ["YOLO_OFFLINE"] = "1"
    os.environ["YOLO_CONFIG_DIR"] = str(folder)
    font = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    (folder / "Ultralytics").mkdir(parents=True, exist_ok=True)
    shutil.copy(font, folder / "Ultralytics" / "Arial.ttf")  # else fetched for label plots
    from ultralytics import settings

    settings.update({"sync": False, "mlflow": False, "comet": False, "clearml": False,
                     "dvc": False, "raytune": False, "wandb": False})  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-id", default="squares-ultralytics")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-seconds", type=float, default=0.0, help="slow each batch")
    parser.add_argument("--early-stop-patience", type=int,
                        help="early stop when val_map50_95 stops improving")  # fmt: skip
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        offline_ultralytics(folder / "config")
        data = write_dataset(folder / "squares")
        early_stop = None
        if args.early_stop_patience is not None:
            early_stop = {"enabled": True, "monitor": "val_map50_95", "mode": "max",
                          "patience": args.early_stop_patience}  # fmt: skip

        from ultralytics import YOLO

        from trainbus.sdk.ultralytics import attach

        model = YOLO("yolov8n.yaml")
        # the trainbus part: one call
        attach(model, args.run_id, early_stop=early_stop, config={"model": "yolov8n"})
        if args.batch_seconds:

            def slow(trainer: Any) -> None:
                time.sleep(args.batch_seconds)

            model.add_callback("on_train_batch_end", slow)
        model.train(data=str(data), epochs=args.epochs, imgsz=IMAGE_SIZE, batch=4,
                    device="cpu", workers=0, plots=False, amp=False, seed=0, verbose=False,
                    project=str(Path.cwd() / "runs"), name=args.run_id, exist_ok=True)  # fmt: skip


if __name__ == "__main__":
    main()
