"""The OpenAPI document is complete, and no generated request gets a 5xx (schemathesis)."""

from __future__ import annotations

import httpx

from .fuzz import operations, server_errors
from .server import LiveServer


def test_no_generated_request_gets_a_server_error(transport_server: LiveServer) -> None:
    """Each operation gets a bounded number of generated requests (valid and invalid)."""
    assert len(operations(transport_server)) >= 14
    assert server_errors(transport_server) == []


def test_every_operation_documents_its_responses(transport_server: LiveServer) -> None:
    document = httpx.get(
        transport_server.url + "/openapi.json", headers=transport_server.headers
    ).json()
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    for path, by_method in document["paths"].items():
        for method, operation in by_method.items():
            assert operation.get("summary"), f"{method} {path} has no summary"
            responses = operation["responses"]
            assert any(code.startswith("2") for code in responses), f"{method} {path}"
            if path not in ("/healthz", "/metrics"):
                assert "401" in responses, f"{method} {path} does not document 401"


def test_a_browser_reads_the_docs_without_the_token(transport_server: LiveServer) -> None:
    """The docs and the schema need no token; the schema names the bearer scheme the docs
    page's Authorize button fills in, and holds no token. (``/`` is the dashboard.)"""
    with httpx.Client(base_url=transport_server.url) as browser:
        docs = browser.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert browser.get("/redoc").status_code == 200
        schema = browser.get("/openapi.json")
        assert schema.status_code == 200
        assert transport_server.token not in schema.text
        assert schema.json()["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert browser.get("/jobs").status_code == 401  # the API itself still needs it
