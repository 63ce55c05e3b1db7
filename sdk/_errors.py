"""The SDK's exceptions: one base, :class:`SDKError`."""

from __future__ import annotations

__all__ = ["RunRefused", "SDKError", "ServerUnreachable"]


class SDKError(Exception):
    """Base of everything the SDK raises."""


class ServerUnreachable(SDKError):
    """No trainbus server answered within the run's ``connect_timeout``."""


class RunRefused(SDKError):
    """The server refused the run (a wrong token, an invalid request, a completed run id):
    the message says what to fix."""
