"""A checkpoint as a model to use: the network its spec describes, its trained weights, and the
preprocessing its dataset applied (feature standardisation, class labels).

::

    from trainbus.worker import load_model

    model = load_model("data/jobs/<job>/checkpoints/best")   # or a downloaded state file
    model.predict([[0.0, 3.0, ...], ...])                    # raw features -> class labels
    logits = model(torch.tensor(raw_rows))                   # a plain nn.Module too
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._errors import SpecError
from ._registry import Registry, default_registry

__all__ = ["ReadyModel", "load_model"]

STATE_FILE = "state.pt"


class ReadyModel(nn.Module):
    """A trained network behind its dataset's preprocessing: it takes raw feature rows.

    ``forward`` standardises the features as in training and returns the network's outputs
    (logits for classification); :meth:`predict` returns class labels or values.
    """

    feature_mean: torch.Tensor
    feature_std: torch.Tensor

    def __init__(
        self,
        network: nn.Module,
        *,
        task: str,
        feature_mean: torch.Tensor,
        feature_std: torch.Tensor,
        class_labels: Sequence[str] = (),
        feature_names: Sequence[str] = (),
        spec: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.network = network
        self.task = task
        self.class_labels = list(class_labels)
        self.feature_names = list(feature_names)
        self.spec = spec or {}
        self.register_buffer("feature_mean", feature_mean.float())
        self.register_buffer("feature_std", feature_std.float())

    @property
    def num_features(self) -> int:
        return int(self.feature_mean.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        result: torch.Tensor = self.network((features - self.feature_mean) / self.feature_std)
        return result

    @torch.no_grad()
    def predict(self, rows: Any) -> list[str] | list[float]:
        """Class labels (classification) or values (regression) for raw feature rows."""
        features = torch.as_tensor(rows, dtype=torch.float32)
        if features.ndim != 2 or features.shape[1] != self.num_features:
            raise ValueError(
                f"expected rows of {self.num_features} features, got shape {tuple(features.shape)}"
            )
        was_training = self.training
        self.eval()
        try:
            outputs = self(features)
        finally:
            self.train(was_training)
        if self.task == "classification":
            indices = outputs.argmax(dim=1).tolist()
            if self.class_labels:
                return [self.class_labels[i] for i in indices]
            return [str(i) for i in indices]
        return [float(v) for v in outputs.reshape(-1).tolist()]


def load_model(path: str | Path, *, registry: Registry | None = None) -> ReadyModel:
    """Turn a checkpoint into a ready model in evaluation mode, on the CPU.

    :param path: a checkpoint folder (``<data>/jobs/<job>/checkpoints/<name>``) or its state
        file (what ``GET /jobs/{id}/checkpoints/{name}`` and ``trainbus download`` save).
    :param registry: where the spec's model is found (default: built-ins and plugins).
    :raises ValueError: if the file is not a trainbus checkpoint with its spec and
        preprocessing (checkpoints from before they were kept cannot be used this way).
    """
    file = Path(path)
    if file.is_dir():
        file = file / STATE_FILE
    state = torch.load(file, map_location="cpu", weights_only=True)  # never unsafe pickles
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a trainbus checkpoint")
    spec, preprocessing = state.get("spec"), state.get("preprocessing")
    if not isinstance(spec, dict) or not isinstance(preprocessing, dict):
        raise ValueError(
            f"{path} holds weights only, without the job's spec and preprocessing (written "
            "by an older trainbus): rebuild the model from the job's spec instead"
        )
    registry = registry or default_registry()
    model_spec = spec["model"]
    try:
        entry = registry.model(model_spec["name"])
        network = entry.build(
            entry.params.model_validate(model_spec.get("params", {})),
            int(preprocessing["num_features"]),
            int(preprocessing["output_size"]),
        )
    except SpecError as error:
        raise ValueError(f"{path}: {error}") from None
    network.load_state_dict(state["model"])
    num_features = int(preprocessing["num_features"])
    mean = preprocessing.get("feature_mean")
    std = preprocessing.get("feature_std")
    model = ReadyModel(
        network,
        task=str(preprocessing["task"]),
        feature_mean=mean if isinstance(mean, torch.Tensor) else torch.zeros(num_features),
        feature_std=std if isinstance(std, torch.Tensor) else torch.ones(num_features),
        class_labels=[str(label) for label in preprocessing.get("class_labels", ())],
        feature_names=[str(name) for name in preprocessing.get("feature_names", ())],
        spec=spec,
    )
    return model.eval()
