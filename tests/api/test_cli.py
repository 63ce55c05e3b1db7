"""The ``trainbus`` command against a live server (through the Python client)."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest
from pydantic import SecretStr

from trainbus.api import Settings
from trainbus.api._auth import ensure_token, write_token_file
from trainbus.api._local import write_server_url
from trainbus.api.cli import build_parser, main
from trainbus.bus import EventType

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
        "save",
        "events",
        "demo",
        "delete",
        "checkpoints",
        "download",
        "models",
        "datasets",
        "predict",
        "set-lr",
    ]:
        assert (
            parser.parse_args(
                [command]
                + (
                    []
                    if command in ("serve", "demo", "jobs", "models", "datasets")
                    else ["x", "y"]
                    if command == "predict"
                    else ["x", "0.1"]
                    if command == "set-lr"
                    else ["x"]
                )
            ).command
            == command
        )


MARKUP = "[/oops] [link=https://attacker.example]click here[/link] [bold red]"


def test_stored_text_is_printed_as_text_never_as_markup(
    transport_server: LiveServer, fake_jobs: FakeJobs, capsys: pytest.CaptureFixture[str]
) -> None:
    """A job's error (from a CSV target, say) holding rich markup is printed literally by
    status, watch, events and the error handler: it neither crashes nor restyles the terminal."""
    job_id = "markup-1"
    fake_jobs.add(job_id)
    fake_jobs.records[job_id].update(
        state="failed", error={"type": "DatasetError", "message": MARKUP}
    )
    done = threading.Event()

    def publish() -> None:
        transport_server.services.bus.publish(
            job_id, EventType.JOB_FAILED, {"error": MARKUP, "reason": MARKUP}
        )
        done.set()

    transport_server.call_soon(publish)
    assert done.wait(10)

    assert _cli(transport_server, "status", job_id) == 0
    assert MARKUP in _joined(capsys.readouterr().out)

    assert _cli(transport_server, "watch", job_id) == 1  # the job failed
    assert MARKUP in _joined(capsys.readouterr().out)

    assert _cli(transport_server, "events", job_id) == 0
    assert json.dumps(MARKUP)[1:-1] in capsys.readouterr().out

    assert _cli(transport_server, "events", job_id, "--types", "[/x]") != 0
    assert "[/x]" in capsys.readouterr().out


def _joined(out: str) -> str:
    """Console output with its line wrapping undone."""
    return " ".join(out.split())


def test_the_cli_finds_the_server_and_token_in_its_data_folder(
    transport_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "server-data"
    write_server_url(folder, transport_server.url)
    write_token_file(folder, SecretStr(transport_server.token))
    assert main(["--data-dir", str(folder), "jobs", "--json"]) == 0
    assert "items" in json.loads(capsys.readouterr().out)
    assert main(["jobs", "--json", "--data-dir", str(folder)]) == 0  # after the command too
    capsys.readouterr()


def test_url_and_token_work_after_the_command_and_a_401_says_where_it_looked(
    transport_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["jobs", "--url", transport_server.url, "--token", transport_server.token]) == 0
    capsys.readouterr()
    empty = tmp_path / "no-token-here"
    assert main(["jobs", "--url", transport_server.url, "--data-dir", str(empty)]) == 1
    said = _joined(capsys.readouterr().out)
    assert "401" in said and str(empty / "token") in said and "--data-dir" in said
    assert main(["jobs", "--url", transport_server.url, "--token", "wrong-token-0000"]) == 1
    assert "token came from --token" in _joined(capsys.readouterr().out)


def test_a_generated_token_survives_a_restart(tmp_path: Path) -> None:
    first, generated = ensure_token(Settings(data_dir=tmp_path, token=None))
    assert generated and first.token is not None
    write_token_file(tmp_path, first.token)  # what the server does at start-up
    again, generated_again = ensure_token(Settings(data_dir=tmp_path, token=None))
    assert not generated_again
    assert again.token == first.token


def test_a_bad_spec_file_gets_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = ["--url", "http://127.0.0.1:9", "--token", "unused-token-0000"]
    assert main([*url, "submit", str(tmp_path / "missing.yaml")]) == 2
    out = capsys.readouterr().out.strip()
    assert "missing.yaml" in out and "\n" not in out and "Traceback" not in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name: mlp\ndataset: [\n")
    assert main([*url, "submit", str(bad)]) == 2
    out = capsys.readouterr().out.strip()
    assert "bad.yaml is not valid YAML (line" in out and "\n" not in out


def test_a_422_is_printed_field_by_field(
    transport_server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.yaml"
    spec.write_text("model:\n  name: mlp\nepochs: -1\n")
    assert _cli(transport_server, "submit", str(spec)) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.strip().startswith("dataset: Field required") for line in lines), lines
    assert any(line.strip().startswith("epochs: ") for line in lines), lines
    assert "'loc'" not in "\n".join(lines)


def test_status_shows_dates_and_events_pages_through_everything(
    transport_server: LiveServer, fake_jobs: FakeJobs, capsys: pytest.CaptureFixture[str]
) -> None:
    job_id = "many-events-1"
    fake_jobs.add(job_id)
    fake_jobs.records[job_id]["created_at"] = 1_797_000_000.0
    done = threading.Event()

    def publish() -> None:
        for i in range(2_500):
            transport_server.services.bus.publish(job_id, EventType.TRAIN_BATCH_END, {"i": i})
        done.set()

    transport_server.call_soon(publish)
    assert done.wait(10)
    assert _cli(transport_server, "status", job_id) == 0
    status = capsys.readouterr().out
    assert re.search(r"created_at\s+2026-\d\d-\d\d \d\d:\d\d:\d\d", status), status
    assert "1797000000" not in status

    assert _cli(transport_server, "events", job_id) == 0
    seqs = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert seqs == list(range(1, 2_501))

    assert _cli(transport_server, "events", job_id, "--limit", "10") == 0
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 10
    assert "--after-seq 10" in captured.err


def test_delete_and_registry_commands(
    transport_server: LiveServer, fake_jobs: FakeJobs, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_jobs.add("doomed-1")
    assert _cli(transport_server, "delete", "doomed-1") == 0
    assert "doomed-1" not in fake_jobs.records
    assert _cli(transport_server, "models") == 0
    assert _cli(transport_server, "datasets") == 0
    assert _cli(transport_server, "checkpoints", "markup-1") == 0
    capsys.readouterr()
