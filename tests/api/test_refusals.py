"""What is refused at the door says what to fix: a WebSocket query as HTTP would answer it, a
CSV dataset that is not there at submission."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from .fakes import FakeJobs
from .server import LiveServer


async def _refusal(server: LiveServer, path: str) -> tuple[int, str]:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            server.ws_url + path, additional_headers=server.headers, compression=None, proxy=None
        ):
            pass
    response = refused.value.response
    return response.status_code, json.loads(response.body)["detail"]


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ("?after_seq=-1", "after_seq must be a whole number"),
        ("?after_seq=abc", "after_seq must be a whole number"),
        ("?after_seq=99999999999999999999", "after_seq must be a whole number"),
        ("?aftr_seq=5", "unknown query parameter 'aftr_seq'"),
        ("?after_seq=1&token=x", "unknown query parameter 'token'"),
    ],
)
async def test_a_job_stream_refuses_a_bad_query_saying_what_is_wrong(
    transport_server: LiveServer, fake_jobs: FakeJobs, query: str, said: str
) -> None:
    fake_jobs.add("query-1")
    status, detail = await _refusal(transport_server, "/jobs/query-1/events/ws" + query)
    assert status == 422
    assert said in detail


async def test_the_all_jobs_stream_refuses_unknown_parameters(
    transport_server: LiveServer,
) -> None:
    status, detail = await _refusal(transport_server, "/events/ws?typs=job_started")
    assert status == 422 and "unknown query parameter 'typs'" in detail


def test_a_missing_csv_is_refused_at_submission_naming_the_field(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    before = len(fake_jobs.records)
    spec = {
        "model": {"name": "mlp"},
        "dataset": {"name": "csv", "params": {"file": "nope.csv"}},
        "epochs": 1,
    }
    response = httpx.post(
        transport_server.url + "/jobs", json=spec, headers=transport_server.headers
    )
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "dataset", "params", "file"]
    assert "nope.csv" in error["msg"]
    assert len(fake_jobs.records) == before
