"""Model and dataset registries: built-ins plus plugins from Python entry points.

A plugin package installed on the server declares, in its own ``pyproject.toml``::

    [project.entry-points."trainbus.models"]
    resnet_tiny = "my_package.models:RESNET_TINY"      # a ModelEntry

    [project.entry-points."trainbus.datasets"]
    my_data = "my_package.data:MY_DATA"                 # a DatasetEntry

    [project.entry-points."trainbus.programs"]
    my_training = "my_package.train:MY_TRAINING"        # a ProgramEntry

A job spec only names entries; it never carries code or import paths.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from torch import nn

from . import _datasets as datasets
from . import _models as models
from ._errors import SpecError

__all__ = ["DatasetEntry", "ModelEntry", "ProgramEntry", "Registry", "default_registry"]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[[Any, int, int], nn.Module]
"""``build(params, in_features, out_features) -> nn.Module``."""

DatasetLoader = Callable[[Any, int, float, Path], datasets.DatasetSplit]
"""``load(params, seed, val_fraction, data_dir) -> DatasetSplit``."""

ProgramTrainer = Callable[[Any, Any], None]
"""``train(run, params) -> None``: the operator's training code; ``run`` is a started
:class:`trainbus.sdk.Run` of the job the server launched it for."""


@dataclass(frozen=True)
class ModelEntry:
    """A model the server can build: its name, parameter model and builder."""

    name: str
    params: type[BaseModel]
    build: ModelBuilder
    description: str = ""


@dataclass(frozen=True)
class DatasetEntry:
    """A dataset the server can load: its name, parameter model and loader."""

    name: str
    params: type[BaseModel]
    load: DatasetLoader
    description: str = ""


@dataclass(frozen=True)
class ProgramEntry:
    """A training program the server can run as a job: its name, parameter model and
    ``train(run, params)`` function (``docs/SDK.md``, "Registered programs")."""

    name: str
    params: type[BaseModel]
    train: ProgramTrainer
    description: str = ""


def _sklearn(name: str, description: str) -> DatasetEntry:
    return DatasetEntry(
        name,
        datasets.NoParams,
        lambda params, seed, fraction, data_dir: datasets.load_sklearn(name, seed, fraction),
        description,
    )


BUILTIN_MODELS = (
    ModelEntry("linear", models.LinearParams, models.build_linear, "One linear layer."),
    ModelEntry("mlp", models.MLPParams, models.build_mlp, "A multi-layer perceptron."),
    ModelEntry("cnn", models.CNNParams, models.build_cnn, "A small CNN for square images."),
)
BUILTIN_DATASETS = (
    _sklearn("digits", "8x8 handwritten digits, 1797 images, 10 classes (scikit-learn)."),
    _sklearn("wine", "Wine recognition, 178 samples, 3 classes (scikit-learn)."),
    _sklearn("iris", "Iris flowers, 150 samples, 3 classes (scikit-learn)."),
    _sklearn("breast_cancer", "Breast cancer Wisconsin, 569 samples, 2 classes (scikit-learn)."),
    DatasetEntry(
        "synthetic_classification",
        datasets.SyntheticClassificationParams,
        lambda params, seed, fraction, data_dir: datasets.load_synthetic_classification(
            params, seed, fraction
        ),
        "Gaussian clusters of any size, for benchmarks.",
    ),
    DatasetEntry(
        "synthetic_regression",
        datasets.SyntheticRegressionParams,
        lambda params, seed, fraction, data_dir: datasets.load_synthetic_regression(
            params, seed, fraction
        ),
        "A noisy linear function of any size, for benchmarks.",
    ),
    DatasetEntry(
        "csv",
        datasets.CSVParams,
        lambda params, seed, fraction, data_dir: datasets.load_csv(
            params, seed, fraction, data_dir
        ),
        "A CSV file from the data folder's datasets/, named by file name only.",
    ),
)


class Registry:
    """Named models, datasets and programs, introspectable for the API."""

    def __init__(self) -> None:
        self.models: dict[str, ModelEntry] = {}
        self.datasets: dict[str, DatasetEntry] = {}
        self.programs: dict[str, ProgramEntry] = {}

    def add_model(self, entry: ModelEntry) -> None:
        self.models[entry.name] = entry

    def add_dataset(self, entry: DatasetEntry) -> None:
        self.datasets[entry.name] = entry

    def add_program(self, entry: ProgramEntry) -> None:
        self.programs[entry.name] = entry

    def model(self, name: str) -> ModelEntry:
        """:raises SpecError: naming the available models if ``name`` is unknown."""
        try:
            return self.models[name]
        except KeyError:
            raise SpecError(
                f"unknown model {name!r}; available models: {', '.join(sorted(self.models))}"
            ) from None

    def dataset(self, name: str) -> DatasetEntry:
        """:raises SpecError: naming the available datasets if ``name`` is unknown."""
        try:
            return self.datasets[name]
        except KeyError:
            raise SpecError(
                f"unknown dataset {name!r}; available datasets: {', '.join(sorted(self.datasets))}"
            ) from None

    def program(self, name: str) -> ProgramEntry:
        """:raises SpecError: naming the registered programs if ``name`` is unknown."""
        try:
            return self.programs[name]
        except KeyError:
            available = ", ".join(sorted(self.programs)) or (
                "none (a server's operator registers them under the trainbus.programs "
                "entry point group)"
            )
            raise SpecError(f"unknown program {name!r}; available programs: {available}") from None

    def load_plugins(self) -> None:
        """Add the entries that installed packages declare under ``trainbus.models``,
        ``trainbus.datasets`` and ``trainbus.programs``; a broken plugin is logged and
        skipped."""
        for group in ("trainbus.models", "trainbus.datasets", "trainbus.programs"):
            for point in entry_points(group=group):
                try:
                    entry = point.load()
                except Exception as error:
                    logger.error("plugin %s in %s failed to load: %r", point.name, group, error)
                    continue
                if group == "trainbus.models" and isinstance(entry, ModelEntry):
                    existing: dict[str, Any] = self.models
                elif group == "trainbus.datasets" and isinstance(entry, DatasetEntry):
                    existing = self.datasets
                elif group == "trainbus.programs" and isinstance(entry, ProgramEntry):
                    existing = self.programs
                else:
                    logger.error("plugin %s in %s is not a registry entry", point.name, group)
                    continue
                if entry.name in existing:  # a plugin never silently replaces an entry
                    logger.error(
                        "plugin %s in %s: the name %r is taken; skipped",
                        point.name,
                        group,
                        entry.name,
                    )
                    continue
                existing[entry.name] = entry

    def describe(self) -> dict[str, Any]:
        """Names, descriptions and JSON schemas of parameters, for ``GET /registry``."""
        return {
            "models": [
                {
                    "name": e.name,
                    "description": e.description,
                    "params": e.params.model_json_schema(),
                }
                for e in sorted(self.models.values(), key=lambda e: e.name)
            ],
            "datasets": [
                {
                    "name": e.name,
                    "description": e.description,
                    "params": e.params.model_json_schema(),
                }
                for e in sorted(self.datasets.values(), key=lambda e: e.name)
            ],
            "programs": [
                {
                    "name": e.name,
                    "description": e.description,
                    "params": e.params.model_json_schema(),
                }
                for e in sorted(self.programs.values(), key=lambda e: e.name)
            ],
        }


@cache
def default_registry() -> Registry:
    """The server's registry: built-ins plus installed plugins (loaded once)."""
    registry = Registry()
    for model in BUILTIN_MODELS:
        registry.add_model(model)
    for dataset in BUILTIN_DATASETS:
        registry.add_dataset(dataset)
    registry.load_plugins()
    return registry
