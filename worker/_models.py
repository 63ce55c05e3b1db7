"""Built-in models: ``linear``, ``mlp`` and ``cnn``, each with validated parameters."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from ._numbers import Bool, Float, Int, not_a_boolean

__all__ = ["CNNParams", "LinearParams", "MLPParams", "build_cnn", "build_linear", "build_mlp"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class LinearParams(BaseModel):
    """A single linear layer (logistic or linear regression)."""

    model_config = ConfigDict(extra="forbid")
    bias: Bool = True


class MLPParams(BaseModel):
    """A multi-layer perceptron."""

    model_config = ConfigDict(extra="forbid")
    hidden_sizes: list[Annotated[int, Field(ge=1, le=4096), not_a_boolean]] = Field(
        default=[64, 64], max_length=8, description="Width of each hidden layer (1..4096)."
    )
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)
    activation: Literal["relu", "gelu", "tanh"] = "relu"


class CNNParams(BaseModel):
    """A small convolutional network for square single-channel images given as flat features
    (8x8 digits: 64 features)."""

    model_config = ConfigDict(extra="forbid")
    channels: list[Annotated[int, Field(ge=1, le=512), not_a_boolean]] = Field(
        default=[16, 32], min_length=1, max_length=4, description="Channels of each layer."
    )
    kernel_size: Int = Field(default=3, ge=1, le=7)
    dropout: Float = Field(default=0.0, ge=0.0, lt=1.0)


def build_linear(params: LinearParams, in_features: int, out_features: int) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=params.bias)


def build_mlp(params: MLPParams, in_features: int, out_features: int) -> nn.Module:
    layers: list[nn.Module] = []
    width = in_features
    for size in params.hidden_sizes:
        layers += [nn.Linear(width, size), _ACTIVATIONS[params.activation]()]
        if params.dropout:
            layers.append(nn.Dropout(params.dropout))
        width = size
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


class _ConvNet(nn.Module):
    def __init__(self, params: CNNParams, side: int, out_features: int) -> None:
        super().__init__()
        self.side = side
        layers: list[nn.Module] = []
        channels_in = 1
        for channels in params.channels:
            layers += [
                nn.Conv2d(
                    channels_in, channels, params.kernel_size, padding=params.kernel_size // 2
                ),
                nn.ReLU(),
            ]
            channels_in = channels
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.dropout = nn.Dropout(params.dropout)
        self.head = nn.Linear(channels_in * 4, out_features)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        images = inputs.view(inputs.shape[0], 1, self.side, self.side)
        hidden = self.pool(self.features(images)).flatten(1)
        return self.head(self.dropout(hidden))  # type: ignore[no-any-return]


def build_cnn(params: CNNParams, in_features: int, out_features: int) -> nn.Module:
    side = math.isqrt(in_features)
    if side * side != in_features:
        raise ValueError(
            f"cnn needs square single-channel images; {in_features} features is not a square "
            "(use mlp for tabular data)"
        )
    return _ConvNet(params, side, out_features)
