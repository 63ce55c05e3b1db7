"""An example trainbus plugin: one model, one dataset and one training program
(``program.py``), declared as entry points in ``pyproject.toml``. Install it next to the
server (``pip install .``) and restart the server; ``trainbus models`` and ``trainbus
datasets`` then list ``residual_mlp`` and ``two_moons``, and ``GET /registry`` lists the
program ``digits_loop`` under ``programs``."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from trainbus.worker import DatasetEntry, DatasetSplit, ModelEntry, split_and_standardise

__all__ = ["RESIDUAL_MLP", "TWO_MOONS"]


class ResidualMLPParams(BaseModel):
    """What a job spec may set under ``model.params`` (validated at submission: bad values
    are a 422 naming the field)."""

    model_config = ConfigDict(extra="forbid")
    width: int = Field(default=64, ge=1, le=1024)
    blocks: int = Field(default=2, ge=1, le=8)


class _Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.relu(inputs + self.layer(inputs))


def build_residual_mlp(params: ResidualMLPParams, in_features: int, out_features: int) -> nn.Module:
    """``build(params, in_features, out_features)``: the server passes the dataset's sizes."""
    return nn.Sequential(
        nn.Linear(in_features, params.width),
        *(_Block(params.width) for _ in range(params.blocks)),
        nn.Linear(params.width, out_features),
    )


class TwoMoonsParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_samples: int = Field(default=1_000, ge=20, le=100_000)
    noise: float = Field(default=0.1, ge=0.0, le=1.0)


def load_two_moons(
    params: TwoMoonsParams, seed: int, val_fraction: float, data_dir: Path
) -> DatasetSplit:
    """``load(params, seed, val_fraction, data_dir)``: generated from the job's seed, so a
    resumed job sees the same data."""
    from sklearn.datasets import make_moons

    features, targets = make_moons(
        n_samples=params.n_samples, noise=params.noise, random_state=seed
    )
    return split_and_standardise(
        features, targets, task="classification", seed=seed, val_fraction=val_fraction
    )


RESIDUAL_MLP = ModelEntry(
    "residual_mlp", ResidualMLPParams, build_residual_mlp, "An MLP with residual blocks."
)
TWO_MOONS = DatasetEntry(
    "two_moons", TwoMoonsParams, load_two_moons, "Two interleaved half circles, 2 classes."
)
