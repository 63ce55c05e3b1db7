"""Random-number-generator state in a form ``torch.load(weights_only=True)`` accepts."""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from ._random import RandomStreams

__all__ = ["capture_rng_state", "restore_rng_state"]


def capture_rng_state(job: RandomStreams) -> dict[str, Any]:
    """Python's and NumPy's global generator states and the job's own torch streams (CPU,
    and CUDA for a CUDA job), as tensors and plain Python values only."""
    version, internal, gauss = random.getstate()
    kind, keys, position, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        **job.state_dict(),
    }
    return state


def restore_rng_state(state: dict[str, Any], job: RandomStreams) -> None:
    """Put back what :func:`capture_rng_state` captured."""
    python = state["python"]
    random.setstate(
        (python["version"], tuple(int(v) for v in python["state"].tolist()), python["gauss"])
    )
    numpy = state["numpy"]
    np.random.set_state(
        (
            numpy["kind"],
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached"],
        )
    )
    job.load_state_dict(state)
