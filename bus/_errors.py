"""Exceptions raised by the event bus.

Hierarchy::

    BusError
    ├── BusClosed          publishing to, or subscribing on, a closed bus
    ├── WouldBlock         a ``*_nowait`` call that would have to wait
    ├── UnknownEventName   a callback or filter names an event type that does not exist
    └── ControlError       a control command is malformed (for example a non-positive lr)
"""

from __future__ import annotations

__all__ = ["BusClosed", "BusError", "ControlError", "UnknownEventName", "WouldBlock"]


class BusError(Exception):
    """Base class of every error the bus raises."""


class BusClosed(BusError):
    """Raised when publishing to, or subscribing on, a bus that has been closed."""


class WouldBlock(BusError):
    """Raised by ``X_nowait`` when ``X()`` would have to wait."""


class UnknownEventName(BusError, ValueError):
    """Raised when a name is not an event type or Ultralytics callback name."""

    def __init__(self, name: str, valid: list[str]) -> None:
        self.name = name
        self.valid = valid
        super().__init__(f"unknown event name {name!r}; valid names are: {', '.join(valid)}")


class ControlError(BusError, ValueError):
    """Raised when a control command is malformed."""
