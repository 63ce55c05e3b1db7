"""Credentials never reach the access log: uvicorn logs each request's path with its query
string, so a token a client put in the URL (``?token=...``) would be written there in clear."""

from __future__ import annotations

import logging
import re
from urllib.parse import quote

__all__ = ["CredentialRedactor", "install_redactor", "redact_query"]

REDACTED = "[redacted]"
SECRET_NAMES = re.compile(r"token|key|secret|pass|auth|credential|signature", re.IGNORECASE)
"""Query parameter names whose values are never logged, whatever endpoint they were sent to."""


def redact_query(target: str, secrets: tuple[str, ...] = ()) -> str:
    """``target`` (a path and query string) with credential-like parameter values and any
    of ``secrets`` (also percent-encoded) replaced by :data:`REDACTED`."""
    path, mark, query = target.partition("?")
    if mark:
        parts = []
        for part in query.split("&"):
            name, equals, _value = part.partition("=")
            parts.append(f"{name}={REDACTED}" if equals and SECRET_NAMES.search(name) else part)
        target = path + mark + "&".join(parts)
    for secret in secrets:
        for form in {secret, quote(secret, safe="")}:
            target = target.replace(form, REDACTED)
    return target


class CredentialRedactor(logging.Filter):
    """Rewrites uvicorn access-log records (HTTP and WebSocket) through :func:`redact_query`."""

    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.secrets = tuple(secret for secret in secrets if secret)

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(arg, str) and ("?" in arg or self.secrets) for arg in record.args
        ):
            record.args = tuple(
                redact_query(arg, self.secrets) if isinstance(arg, str) else arg
                for arg in record.args
            )
        return True


def install_redactor(secrets: tuple[str, ...] = ()) -> CredentialRedactor:
    """The :class:`CredentialRedactor` on uvicorn's access logger (one per process; each
    server in the process adds its own token to it)."""
    access = logging.getLogger("uvicorn.access")
    for existing in access.filters:
        if isinstance(existing, CredentialRedactor):
            existing.secrets = tuple(dict.fromkeys((*existing.secrets, *secrets)))
            return existing
    redactor = CredentialRedactor(secrets)
    access.addFilter(redactor)
    return redactor
