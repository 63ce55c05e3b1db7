"""Generated requests (schemathesis, bounded) against a live server: no 5xx."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .server import LiveServer


def operations(server: LiveServer) -> list[Any]:
    document = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]


def server_errors(
    server: LiveServer,
    *,
    max_examples: int = 8,
    include: Callable[[Any], bool] = lambda operation: True,
) -> list[str]:
    """Requests (valid and invalid) per operation; returns those answered with a 5xx."""
    failures: list[str] = []
    selected = [operation for operation in operations(server) if include(operation)]
    for operation, mode in itertools.product(selected, list(GenerationMode)):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=max_examples,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(base_url=server.url, headers=server.headers, timeout=10)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong (no parameters)
    return failures
