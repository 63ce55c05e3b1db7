"""The ``trainbus`` command against a live server (through the Python client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from api.cli import build_parser, main

from .fakes import FakeJobs
from .server import LiveServer


def _cli(server: LiveServer, *args: str) -> int:
    return main(["--url", server.url, "--token", server.token, *args])


def test_submit_jobs_status_pause_events(
    transport_server: LiveServer,
    fake_jobs: FakeJobs,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model:\n  name: mlp\ndataset:\n  name: digits\nepochs: 1\n")
    assert _cli(transport_server, "submit", str(spec)) == 0
    submitted = capsys.readouterr().out
    job_id = submitted.split()[1]
    assert job_id in fake_jobs.records
    assert fake_jobs.records[job_id]["spec"]["dataset"]["name"] == "digits"

    assert _cli(transport_server, "jobs", "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert job_id in [job["id"] for job in page["items"]]

    assert _cli(transport_server, "status", job_id, "--json") == 0
    assert json.loads(capsys.readouterr().out)["id"] == job_id

    assert _cli(transport_server, "pause", job_id) == 0
    assert "pause requested" in capsys.readouterr().out

    assert _cli(transport_server, "events", job_id) == 0
    capsys.readouterr()


def test_errors_are_reported_not_raised(
    transport_server: LiveServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli(transport_server, "status", "no-such-job") == 1
    assert "404" in capsys.readouterr().out
    assert main(["--url", transport_server.url, "--token", "wrong-token-0000", "jobs"]) == 1
    assert "401" in capsys.readouterr().out


def test_every_command_is_there() -> None:
    parser = build_parser()
    for command in [
        "serve",
        "submit",
        "jobs",
        "status",
        "watch",
        "pause",
        "resume",
        "stop",
        "events",
        "demo",
    ]:
        assert (
            parser.parse_args(
                [command] + ([] if command in ("serve", "demo", "jobs") else ["x"])
            ).command
            == command
        )
