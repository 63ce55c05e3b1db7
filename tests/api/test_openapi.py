"""The OpenAPI document is complete, and no generated request gets a 5xx (schemathesis)."""

from __future__ import annotations

import itertools
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from .server import LiveServer


def _operations(server: LiveServer) -> list[Any]:
    document = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    schema = schemathesis.openapi.from_dict(document)
    return [result.ok() for result in schema.get_all_operations()]


def test_no_generated_request_gets_a_server_error(transport_server: LiveServer) -> None:
    """Each operation gets a bounded number of generated requests (valid and invalid)."""
    operations = _operations(transport_server)
    assert len(operations) >= 14
    failures: list[str] = []
    for operation, mode in itertools.product(operations, list(GenerationMode)):

        @given(case=operation.as_strategy(mode))
        @settings(
            max_examples=8,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: Any) -> None:
            response = case.call(
                base_url=transport_server.url, headers=transport_server.headers, timeout=10
            )
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path}: {response.text[:200]}")

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # nothing to get wrong (no parameters)
    assert not failures, failures


def test_every_operation_documents_its_responses(transport_server: LiveServer) -> None:
    document = httpx.get(
        transport_server.url + "/openapi.json", headers=transport_server.headers
    ).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), f"{method} {path}"
            if path not in ("/healthz", "/metrics"):
                assert "401" in responses, f"{method} {path} does not document 401"
