"""Built-in datasets, all offline: scikit-learn's bundled copies, synthetic ones sized for
benchmarks, and CSV files from the data folder (by name only)."""

from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ._errors import DatasetError
from ._numbers import Float, Int

__all__ = [
    "CSVParams",
    "DatasetSplit",
    "NoParams",
    "SyntheticClassificationParams",
    "SyntheticRegressionParams",
    "load_csv",
    "load_sklearn",
    "load_synthetic_classification",
    "load_synthetic_regression",
    "split_and_standardise",
]

Task = Literal["classification", "regression"]

MAX_VALUES = 50_000_000
"""The most feature values a dataset may hold (200 MB as float32): bounds what one request
can make the server allocate."""
MAX_CSV_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class DatasetSplit:
    """Standardised train and validation tensors and what the model must predict."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    task: Task
    num_classes: int  # 0 for regression
    feature_mean: torch.Tensor | None = None
    """What was subtracted from each raw feature (the training set's mean)."""
    feature_std: torch.Tensor | None = None
    """What each centred feature was divided by (the training set's standard deviation)."""
    class_labels: tuple[str, ...] = ()
    """The class each output index stands for (classification)."""
    feature_names: tuple[str, ...] = ()
    """The raw features' column names, where the source has them (CSV)."""

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    def preprocessing(self) -> dict[str, Any]:
        """What turns raw rows into model inputs and outputs into answers, as checkpoints keep
        it (tensors, strings and numbers only)."""
        return {
            "task": self.task,
            "num_features": self.num_features,
            "output_size": self.output_size,
            "feature_mean": self.feature_mean,
            "feature_std": self.feature_std,
            "class_labels": list(self.class_labels),
            "feature_names": list(self.feature_names),
        }

    @property
    def output_size(self) -> int:
        return self.num_classes if self.task == "classification" else 1


class NoParams(BaseModel):
    """This dataset takes no parameters."""

    model_config = ConfigDict(extra="forbid")


class SyntheticClassificationParams(BaseModel):
    """Gaussian clusters, one per class, generated from the job's seed."""

    model_config = ConfigDict(extra="forbid")
    n_samples: Int = Field(default=2_000, ge=10, le=2_000_000)
    n_features: Int = Field(default=20, ge=1, le=4_096)
    n_classes: Int = Field(default=4, ge=2, le=1_000)
    noise: Float = Field(default=1.0, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _bounded(self) -> SyntheticClassificationParams:
        _check_size(self.n_samples, self.n_features)
        return self


class SyntheticRegressionParams(BaseModel):
    """A noisy linear function of Gaussian features, generated from the job's seed."""

    model_config = ConfigDict(extra="forbid")
    n_samples: Int = Field(default=2_000, ge=10, le=2_000_000)
    n_features: Int = Field(default=20, ge=1, le=4_096)
    noise: Float = Field(default=0.1, ge=0.0, le=100.0)

    @model_validator(mode="after")
    def _bounded(self) -> SyntheticRegressionParams:
        _check_size(self.n_samples, self.n_features)
        return self


def _check_size(n_samples: int, n_features: int) -> None:
    if n_samples * n_features > MAX_VALUES:
        raise ValueError(
            f"n_samples x n_features is {n_samples * n_features:,}; at most {MAX_VALUES:,} "
            "feature values are allowed"
        )


_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class CSVParams(BaseModel):
    """A CSV file with a header row, read from ``<data>/datasets/`` by its name alone."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(
        pattern=_FILE_NAME.pattern,
        description="A file name inside the data folder's datasets/ (no path).",
    )
    target: str | None = Field(default=None, description="Target column (default: the last).")
    task: Literal["auto", "classification", "regression"] = "auto"

    @field_validator("file", mode="before")
    @classmethod
    def _bare_name(cls, value: Any) -> Any:
        # before the pattern check, so that a refused name gets this message
        if isinstance(value, str) and not _FILE_NAME.fullmatch(value):
            raise ValueError(
                "file must be a bare file name inside the data folder's datasets/ (letters, "
                "digits, '.', '_', '-', starting with a letter or digit; no paths)"
            )
        return value


def split_and_standardise(
    features: np.ndarray[Any, Any],
    targets: np.ndarray[Any, Any],
    *,
    task: Task,
    seed: int,
    val_fraction: float,
) -> DatasetSplit:
    """A deterministic (stratified for classification) split by ``seed``, then features
    standardised with the training statistics."""
    rng = np.random.default_rng(seed)
    count = len(targets)
    if task == "classification":
        classes, labels = np.unique(targets, return_inverse=True)
        val_index: list[int] = []
        for label in range(len(classes)):
            members = np.flatnonzero(labels == label)
            rng.shuffle(members)
            take = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
            val_index.extend(members[:take].tolist())
        is_val = np.zeros(count, dtype=bool)
        is_val[val_index] = True
        y = torch.as_tensor(labels, dtype=torch.long)
        num_classes = len(classes)
        class_labels = tuple(str(value) for value in classes)
    else:
        order = rng.permutation(count)
        is_val = np.zeros(count, dtype=bool)
        is_val[order[: max(1, round(count * val_fraction))]] = True
        y = torch.as_tensor(targets, dtype=torch.float32).reshape(-1, 1)
        num_classes = 0
        class_labels = ()
    x = np.asarray(features, dtype=np.float64)
    mean = x[~is_val].mean(axis=0)
    std = x[~is_val].std(axis=0)
    std[std == 0] = 1.0
    x_tensor = torch.as_tensor((x - mean) / std, dtype=torch.float32)
    train = torch.as_tensor(~is_val)
    val = torch.as_tensor(is_val)
    if int(train.sum()) == 0 or int(val.sum()) == 0:
        raise DatasetError("the dataset is too small to split into train and validation sets")
    return DatasetSplit(
        x_tensor[train],
        y[train],
        x_tensor[val],
        y[val],
        task,
        num_classes,
        feature_mean=torch.as_tensor(mean, dtype=torch.float32),
        feature_std=torch.as_tensor(std, dtype=torch.float32),
        class_labels=class_labels,
    )


_SKLEARN_LOADERS = {
    "digits": "load_digits",
    "wine": "load_wine",
    "iris": "load_iris",
    "breast_cancer": "load_breast_cancer",
}


def load_sklearn(name: str, seed: int, val_fraction: float) -> DatasetSplit:
    """One of scikit-learn's bundled classification datasets (shipped with the package)."""
    import sklearn.datasets

    bunch = getattr(sklearn.datasets, _SKLEARN_LOADERS[name])()
    split = split_and_standardise(
        bunch.data, bunch.target, task="classification", seed=seed, val_fraction=val_fraction
    )
    names = tuple(str(bunch.target_names[int(label)]) for label in split.class_labels)
    return dataclasses.replace(split, class_labels=names)


def load_synthetic_classification(
    params: SyntheticClassificationParams, seed: int, val_fraction: float
) -> DatasetSplit:
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(params.n_classes, params.n_features, generator=generator) * 3
    labels = torch.randint(0, params.n_classes, (params.n_samples,), generator=generator)
    noise = torch.randn(params.n_samples, params.n_features, generator=generator) * params.noise
    features = centres[labels] + noise
    return split_and_standardise(
        features.numpy(),
        labels.numpy(),
        task="classification",
        seed=seed,
        val_fraction=val_fraction,
    )


def load_synthetic_regression(
    params: SyntheticRegressionParams, seed: int, val_fraction: float
) -> DatasetSplit:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(params.n_samples, params.n_features, generator=generator)
    weights = torch.randn(params.n_features, generator=generator)
    targets = features @ weights + torch.randn(params.n_samples, generator=generator) * params.noise
    return split_and_standardise(
        features.numpy(), targets.numpy(), task="regression", seed=seed, val_fraction=val_fraction
    )


def resolve_dataset_file(data_dir: Path, file: str) -> Path:
    """The path of ``file`` inside ``<data_dir>/datasets``, refusing anything that resolves
    (symbolic links followed) outside that folder.

    :raises DatasetError: if the name escapes the folder or the file does not exist.
    """
    if "\x00" in file or "/" in file or "\\" in file or file in {".", ".."}:
        raise DatasetError(f"dataset file {file!r} must be a bare name, not a path")
    folder = (data_dir / "datasets").resolve()
    candidate = (folder / file).resolve()
    if candidate.parent != folder:
        raise DatasetError(f"dataset file {file!r} resolves outside the data folder's datasets/")
    if not candidate.is_file():
        available = sorted(p.name for p in folder.glob("*.csv")) if folder.is_dir() else []
        raise DatasetError(
            f"no dataset file {file!r} in the data folder's datasets/; "
            f"available: {', '.join(available) or 'none'}"
        )
    return candidate


def load_csv(params: CSVParams, seed: int, val_fraction: float, data_dir: Path) -> DatasetSplit:
    path = resolve_dataset_file(data_dir, params.file)
    if path.stat().st_size > MAX_CSV_BYTES:
        raise DatasetError(f"{params.file}: larger than {MAX_CSV_BYTES // 2**20} MiB")
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if len(rows) < 3:
        raise DatasetError(f"{params.file}: needs a header row and at least two data rows")
    header, body = rows[0], rows[1:]
    target = params.target or header[-1]
    if target not in header:
        raise DatasetError(f"{params.file}: no column {target!r}; columns: {', '.join(header)}")
    column = header.index(target)
    try:
        features = np.array(
            [[float(v) for i, v in enumerate(row) if i != column] for row in body],
            dtype=np.float64,
        )
    except ValueError as error:
        raise DatasetError(f"{params.file}: feature columns must be numeric ({error})") from None
    raw_targets = [row[column] for row in body]
    task = params.task
    if task == "auto":
        task = "classification" if _looks_categorical(raw_targets) else "regression"
    if task == "regression":
        try:
            targets = np.array([float(v) for v in raw_targets])
        except ValueError as error:
            raise DatasetError(
                f"{params.file}: regression targets must be numeric ({error})"
            ) from None
    else:
        targets = np.array(raw_targets)
    if not np.isfinite(features).all():
        raise DatasetError(f"{params.file}: features contain NaN or infinite values")
    split = split_and_standardise(
        features, targets, task=task, seed=seed, val_fraction=val_fraction
    )
    names = tuple(name for index, name in enumerate(header) if index != column)
    return dataclasses.replace(split, feature_names=names)


def _looks_categorical(values: list[str]) -> bool:
    distinct = set(values)
    if len(distinct) > max(20, int(math.sqrt(len(values)))):
        return False
    try:
        return all(float(v).is_integer() for v in distinct)
    except ValueError:
        return True
