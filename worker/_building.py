"""What a spec turns into besides the model and data: the device, the optimizer and the
learning-rate schedule."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ._errors import SpecError
from ._spec import JobSpec, OptimizerSpec

__all__ = ["build_optimizer", "build_scheduler", "check_runtime", "resolve_device"]


def resolve_device(requested: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without one is a spec error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SpecError(f"device {requested!r} was asked for, but this server has no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SpecError(
                f"device {requested!r} does not exist; this server has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    return device


def check_runtime(spec: JobSpec) -> torch.device:
    """The device ``spec`` runs on here; refuses what this server cannot do.

    :raises SpecError: for a CUDA device on a server without one, or fp16 without CUDA.
    """
    device = resolve_device(spec.device)
    if spec.precision == "fp16" and device.type != "cuda":
        raise SpecError("precision 'fp16' needs a CUDA device; use 'bf16' or 'fp32' on the CPU")
    return device


def build_optimizer(spec: OptimizerSpec, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    """``sgd`` (with momentum), ``adam`` or ``adamw``."""
    if spec.name == "sgd":
        return torch.optim.SGD(
            params, lr=spec.lr, momentum=spec.momentum, weight_decay=spec.weight_decay
        )
    if spec.name == "adam":
        return torch.optim.Adam(params, lr=spec.lr, weight_decay=spec.weight_decay)
    return torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)


def build_scheduler(
    spec: JobSpec, optimizer: torch.optim.Optimizer, batches_per_epoch: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The spec's schedule: ``step`` and ``cosine`` step once per epoch, ``onecycle`` once
    per batch; ``none`` gives None."""
    params = spec.scheduler.params
    name = spec.scheduler.name
    if name == "step":
        return torch.optim.lr_scheduler.StepLR(
            optimizer, step_size=int(params.get("step_size", 10)), gamma=params.get("gamma", 0.1)
        )
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(
            optimizer, T_max=spec.epochs, eta_min=params.get("eta_min", 0.0)
        )
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=params.get("max_lr", spec.optimizer.lr * 10),
            total_steps=spec.epochs * batches_per_epoch,
            pct_start=params.get("pct_start", 0.3),
        )
    return None
