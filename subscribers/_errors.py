"""Exceptions raised by the subscribers.

Hierarchy::

    SubscribersError
    └── CheckpointError         a checkpoint cannot be written, found or loaded
        ├── CheckpointNotFound  no checkpoint of that name, or no valid one at all
        ├── CheckpointCorrupt   files missing, sizes or sha256 hashes differ from the manifest
        └── UnsafeCheckpoint    the pickle needs more than tensors and plain containers

(``SubscribersError`` is not the ``subscriber_error`` event: that one reports a handler that
raised; these are raised to callers of this package.)
"""

from __future__ import annotations

__all__ = [
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointNotFound",
    "SubscribersError",
    "UnsafeCheckpoint",
]


class SubscribersError(Exception):
    """Base class of every error the subscribers package raises."""


class CheckpointError(SubscribersError):
    """Raised when a checkpoint cannot be written, found or loaded."""


class CheckpointNotFound(CheckpointError, LookupError):
    """Raised when no checkpoint has the given name, or no valid checkpoint exists."""


class CheckpointCorrupt(CheckpointError):
    """Raised when a checkpoint's files do not match its manifest (or it has none)."""


class UnsafeCheckpoint(CheckpointError):
    """Raised when a checkpoint can only be loaded by running code from its pickle.

    Such a file is never loaded: trainbus only uses ``torch.load(..., weights_only=True)``.
    """
