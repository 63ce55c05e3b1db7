"""Synchronous callbacks in the Ultralytics style, run inline on the training thread."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from ._errors import UnknownEventName
from ._events import CALLBACK_EVENT_TYPES, EventType, event_type_for

__all__ = ["Callback", "CallbackRegistry"]

logger = logging.getLogger(__name__)

Callback = Callable[[Any], object]
ErrorReporter = Callable[[EventType, Callback, Exception], None]


class CallbackRegistry:
    """``add_callback("on_train_epoch_end", fn)``; ``fn(trainer)`` runs inline.

    Unlike Ultralytics, an unknown name is an error that lists the valid names, and a
    callback that raises is reported (through ``on_error``) instead of ending training.
    """

    def __init__(self, on_error: ErrorReporter | None = None) -> None:
        self._callbacks: dict[EventType, list[Callback]] = {}
        self._on_error = on_error
        self.version = 0
        """Changes whenever a callback is added or removed (a cheap check for hot loops)."""

    @staticmethod
    def _callback_type(name: str | EventType) -> EventType:
        valid = sorted(f"on_{t.value}" for t in CALLBACK_EVENT_TYPES)
        try:
            event_type = event_type_for(name)
        except UnknownEventName:
            raise UnknownEventName(str(name), valid) from None
        if event_type not in CALLBACK_EVENT_TYPES:
            raise UnknownEventName(str(name), valid)
        return event_type

    def add_callback(self, name: str | EventType, callback: Callback) -> None:
        """Run ``callback(trainer)`` at the event ``name`` (``on_x`` or ``x``).

        :raises UnknownEventName: if ``name`` is not a trainer or validator callback.
        """
        if not callable(callback):
            raise TypeError(f"callback for {name!r} must be callable, got {callback!r}")
        self._callbacks.setdefault(self._callback_type(name), []).append(callback)
        self.version += 1

    def remove_callback(self, name: str | EventType, callback: Callback) -> None:
        """Remove one registration of ``callback`` for ``name`` (a no-op if absent)."""
        callbacks = self._callbacks.get(self._callback_type(name), [])
        if callback in callbacks:
            callbacks.remove(callback)
            self.version += 1

    def has_callbacks(self, event_types: Iterable[EventType]) -> bool:
        """True when a callback is registered for any of ``event_types``."""
        return any(self._callbacks.get(event_type) for event_type in event_types)

    def get_callbacks(self, name: str | EventType) -> list[Callback]:
        """The callbacks registered for ``name``, in registration order."""
        return list(self._callbacks.get(self._callback_type(name), []))

    def run_callbacks(self, event_type: EventType, trainer: Any) -> None:
        """Run every callback for ``event_type``; a raising one is reported, not propagated."""
        callbacks = self._callbacks.get(event_type)
        if not callbacks:
            return
        for callback in callbacks:
            try:
                callback(trainer)
            except Exception as error:
                logger.error("callback %r for on_%s failed: %r", callback, event_type.value, error)
                if self._on_error is not None:
                    self._on_error(event_type, callback, error)
