"""Errors: JSON with a message saying what to fix, 404 for unknown ids, never a 500."""

from __future__ import annotations

import httpx
import pytest

from .server import LiveServer


@pytest.mark.parametrize(
    "path",
    [
        "/jobs/..%2F..%2Fetc%2Fpasswd",
        "/jobs/%2e%2e%2f%2e%2e%2f",
        "/jobs/a%00b",
        "/jobs/" + "x" * 65,
        "/jobs/fake-1/checkpoints/..%2Fstate.pt",
        "/jobs/fake-1/checkpoints/%2e%2e",
        "/jobs/no-such-job",
        "/jobs/no-such-job/events",
        "/jobs/no-such-job/checkpoints",
        "/jobs/fake-1/checkpoints/not-listed",
    ],
)
def test_hostile_or_unknown_ids_are_400_404_or_422(transport_server: LiveServer, path: str) -> None:
    response = httpx.get(transport_server.url + path, headers=transport_server.headers)
    assert response.status_code in (400, 404, 422), response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["detail"]


def test_unknown_event_type_names_the_valid_ones(transport_server: LiveServer) -> None:
    response = httpx.get(
        transport_server.url + "/jobs/fake-1/events?types=train_epoch_end,nope",
        headers=transport_server.headers,
    )
    assert response.status_code == 422
    assert "nope" in response.json()["detail"] and "fit_epoch_end" in response.json()["detail"]


def test_bad_query_names_the_field(transport_server: LiveServer) -> None:
    response = httpx.get(
        transport_server.url + "/jobs?limit=0&state=bogus", headers=transport_server.headers
    )
    assert response.status_code == 422
    fields = {tuple(item["loc"]) for item in response.json()["detail"]}
    assert ("query", "limit") in fields and ("query", "state") in fields


def test_malformed_json_body_is_422(transport_server: LiveServer) -> None:
    response = httpx.post(
        transport_server.url + "/jobs",
        content=b"{not json",
        headers={**transport_server.headers, "content-type": "application/json"},
    )
    assert response.status_code == 422


def test_unknown_route_and_method(transport_server: LiveServer) -> None:
    missing = httpx.get(transport_server.url + "/nope", headers=transport_server.headers)
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["detail"]
    wrong = httpx.put(transport_server.url + "/jobs", headers=transport_server.headers)
    assert wrong.status_code == 405 and wrong.json()["detail"]
