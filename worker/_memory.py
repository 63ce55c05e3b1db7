"""How much memory a job will take, estimated from its spec before it is accepted.

Each spec field is bounded, but not their product: 8 hidden layers of 4,096, 781,250 samples
of 64 features and batches of 65,536 are each allowed and together take about 18 GiB. The
estimate adds what a running job holds:

- the model's parameters and their gradients (the model is built on PyTorch's ``meta``
  device: shapes only, no memory);
- the optimizer's state (a momentum buffer for SGD, two moments for Adam and AdamW);
- the dataset's tensors (float32 features; int64 labels or float32 targets) and, while it
  loads, the float64 array they are made from;
- the activations of one training batch, which autograd keeps for the backward pass, and
  the gradients of the largest two (a ``meta`` forward pass with a hook on every module);
- the checkpoint writer's CPU snapshots of model and optimizer (up to two), and the best
  weights early stopping keeps with ``restore_best``.

Built-in datasets know their shape from their parameters (a CSV file from its header and
size); a plugin dataset's shape is unknown until it loads, so only its model and batch count.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import _datasets as datasets
from ._errors import DatasetError, SpecError
from ._registry import Registry
from ._spec import JobSpec

__all__ = ["MemoryEstimate", "estimate_memory"]

_FLOAT = 4  # bytes of a float32
_SKLEARN_SHAPES = {  # samples, features, classes
    "digits": (1797, 64, 10),
    "wine": (178, 13, 3),
    "iris": (150, 4, 3),
    "breast_cancer": (569, 30, 2),
}


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes a job is expected to hold while it runs, by what holds them."""

    parameters: int
    optimizer: int
    data: int
    activations: int
    snapshots: int

    @property
    def total(self) -> int:
        return self.parameters + self.optimizer + self.data + self.activations + self.snapshots

    def describe(self) -> str:
        parts = {
            "parameters and gradients": self.parameters,
            "optimizer state": self.optimizer,
            "dataset": self.data,
            "activations of a batch": self.activations,
            "checkpoint snapshots": self.snapshots,
        }
        return ", ".join(f"{name} {format_bytes(size)}" for name, size in parts.items() if size)


def format_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _dataset_shape(spec: JobSpec, registry: Registry, data_dir: Path) -> tuple[int, int, int]:
    """Samples, features and model outputs of the spec's dataset, or (0, 0, 0) if unknown."""
    name = spec.dataset.name
    entry = registry.dataset(name)
    params = entry.params.model_validate(spec.dataset.params)
    if name in _SKLEARN_SHAPES:
        return _SKLEARN_SHAPES[name]
    if isinstance(params, datasets.SyntheticClassificationParams):
        return params.n_samples, params.n_features, params.n_classes
    if isinstance(params, datasets.SyntheticRegressionParams):
        return params.n_samples, params.n_features, 1
    if isinstance(params, datasets.CSVParams):
        return _csv_shape(params, data_dir)
    return 0, 0, 0


def _csv_shape(params: datasets.CSVParams, data_dir: Path) -> tuple[int, int, int]:
    """From the header and the file's size over the length of its first rows (the outputs,
    known only once the targets are read, taken as 2)."""
    try:
        path = datasets.resolve_dataset_file(data_dir, params.file)
        size = path.stat().st_size
        with path.open(newline="") as handle:
            head = [line for _, line in zip(range(101), handle, strict=False)]
    except (OSError, DatasetError):
        return 0, 0, 0  # the job fails to load it, with its own message
    if len(head) < 2:
        return 0, 0, 0
    columns = len(next(csv.reader(head[:1])))
    mean_line = sum(len(line.encode()) for line in head[1:]) / (len(head) - 1)
    return math.ceil(size / max(mean_line, 1)), max(columns - 1, 1), 2


def estimate_memory(spec: JobSpec, registry: Registry, data_dir: Path) -> MemoryEstimate:
    """The memory ``spec`` takes as a running job (see the module's description).

    :raises SpecError: if the model cannot be built for the dataset's shape.
    """
    samples, features, outputs = _dataset_shape(spec, registry, data_dir)
    model_entry = registry.model(spec.model.name)
    model_params = model_entry.params.model_validate(spec.model.params)
    if features == 0:  # a plugin dataset: its shape is unknown until it loads
        return MemoryEstimate(0, 0, 0, 0, 0)
    try:
        with torch.device("meta"):
            model = model_entry.build(model_params, features, outputs)
    except ValueError as error:
        raise SpecError(f"model {spec.model.name!r}: {error}") from None
    parameter_count = sum(p.numel() for p in model.parameters())
    parameters = 2 * parameter_count * _FLOAT  # the weights and their gradients
    moments = {"sgd": 1 if spec.optimizer.momentum else 0, "adam": 2, "adamw": 2}
    optimizer = moments[spec.optimizer.name] * parameter_count * _FLOAT
    label = 8 if outputs > 1 else _FLOAT
    # the float32 tensors, and the float64 array they are standardised from while loading
    data = samples * (features * (_FLOAT + 8) + label)
    batch = min(spec.batch_size, max(samples, 1))
    activations = _activation_bytes(model, batch, features)
    snapshots = 0
    if spec.checkpoint.enabled:
        snapshots += 2 * (parameter_count * _FLOAT + optimizer)
    if spec.early_stop.enabled and spec.early_stop.restore_best:
        snapshots += parameter_count * _FLOAT
    return MemoryEstimate(parameters, optimizer, data, activations, snapshots)


def _activation_bytes(model: nn.Module, batch: int, features: int) -> int:
    """Bytes of every leaf module's output for one batch, and of the gradients of the two
    largest, from a forward pass on ``meta``."""
    sizes: list[int] = []

    def count(module: nn.Module, inputs: object, output: object) -> None:
        if isinstance(output, torch.Tensor):
            sizes.append(output.numel() * output.element_size())

    leaves = [module for module in model.modules() if not any(module.children())]
    hooks = [module.register_forward_hook(count) for module in leaves]
    try:
        with torch.no_grad():
            model(torch.empty(batch, features, device="meta"))
    except Exception:  # a model that cannot run on meta tensors: its input batch only
        return batch * features * _FLOAT
    finally:
        for hook in hooks:
            hook.remove()
    return sum(sizes) + sum(sorted(sizes)[-2:])
