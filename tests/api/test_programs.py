"""Registered programs on a real server: the plugin example's program and two test programs,
registered through ``trainbus.programs`` entry points of distributions installed next to a
real ``trainbus serve``, run as jobs in worker processes, steered from the API, their output
in ``log`` events (rate-limited, lines cut to a bound, what was held back counted) and in the
job's downloadable log file."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.served import TOKEN, Served, serve
from trainbus.api import TrainbusClient
from trainbus.worker._output import LogLimits

REPOSITORY = Path(__file__).resolve().parents[2]
EXAMPLE = REPOSITORY / "examples" / "trainbus-plugin-example"
LIMITS = LogLimits()
STOP_GRACE_SECONDS = 1.5


def _install(site: Path, scratch: Path) -> None:
    """The plugin example as a user installs it (pip, no network), and a distribution that
    declares the test programs of ``tests/api/programs.py``."""
    source = shutil.copytree(EXAMPLE, scratch / "example")  # the build writes beside it
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-build-isolation",
         "--no-deps", "--no-index", "--target", str(site), str(source)],
        check=True,
        timeout=120,
    )  # fmt: skip
    info = site / "trainbus_test_programs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trainbus-test-programs\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(
        "[trainbus.programs]\nflood = tests.api.programs:FLOOD\n"
        "fail = tests.api.programs:FAIL\nhang = tests.api.programs:HANG\n"
        "crash = tests.api.programs:CRASH\n"
    )


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    scratch = tmp_path_factory.mktemp("programs")
    site = scratch / "site"
    _install(site, scratch)
    with serve(
        scratch / "data",
        site,
        resource_interval_seconds="60",
        max_running_jobs="4",
        stop_grace_seconds=str(STOP_GRACE_SECONDS),
    ) as served:
        yield served


def _next(events: Iterator[dict[str, Any]], wanted: str, **data: Any) -> dict[str, Any]:
    """The stream's next event of type ``wanted`` whose data has ``data``'s values."""
    for event in events:
        if event["type"] == wanted and all(event["data"].get(k) == v for k, v in data.items()):
            return event
    raise AssertionError(f"the stream ended before {wanted} {data}")


def _all_events(api: TrainbusClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while page := api.events(job_id, after_seq=events[-1]["seq"] if events else 0):
        events.extend(page)
    return events


def test_the_registry_lists_programs_with_their_parameters(served: Served) -> None:
    with served.client() as api:
        programs = {p["name"]: p for p in api.registry()["programs"]}
    assert {"digits_loop", "flood", "fail", "hang"} <= set(programs)
    assert programs["digits_loop"]["params"]["properties"]["epochs"]["maximum"] == 10_000
    assert "scikit-learn" in programs["digits_loop"]["description"]


def test_a_program_runs_as_a_job_steered_from_the_api(served: Served) -> None:
    with served.client() as api:
        job = api.submit(
            {"name": "digits", "program": {"name": "digits_loop", "params": {"epochs": 5000}}}
        )
        assert job["state"] == "queued" and job["spec"]["program"]["name"] == "digits_loop"
        stream = api.stream(job["id"])
        first = _next(stream, "log", stream="stdout")
        assert first["data"]["line"].startswith("epoch 0: train_loss ")
        _next(stream, "train_batch_end")

        paused_by = api.pause(job["id"])["command_id"]
        paused = _next(stream, "job_paused", command_id=paused_by)
        assert paused["data"]["step"] > 0
        assert api.wait(job["id"], ["paused"], timeout=10)["state"] == "paused"
        lr_by = api.set_lr(job["id"], 0.0005)["command_id"]
        changed = _next(stream, "lr_changed", command_id=lr_by)
        assert changed["data"]["lr"] == 0.0005 and changed["data"]["step"] == paused["data"]["step"]
        resumed_by = api.resume(job["id"])["command_id"]
        resumed = _next(stream, "job_resumed", command_id=resumed_by)
        assert resumed["data"]["step"] == paused["data"]["step"]
        saved_by = api.save(job["id"])["command_id"]
        saved = _next(stream, "model_save", command_id=saved_by)
        assert saved["data"]["step"] >= resumed["data"]["step"]

        stopped_by = api.stop(job["id"])["command_id"]
        stopping = _next(stream, "job_stopping", command_id=stopped_by)
        ended = _next(stream, "job_stopped")
        assert ended["data"]["step"] == stopping["data"]["step"] >= saved["data"]["step"]
        record = api.job(job["id"])
        assert record["state"] == "stopped", record
        assert record["step"] == stopping["data"]["step"]

        api.resume(job["id"])  # the program runs again from its start; the history rewinds
        again = _next(api.stream(job["id"], after_seq=ended["seq"]), "train_start")
        assert again["data"]["resumed"] is True and again["data"]["from_step"] == 0
        api.stop(job["id"])
        assert api.wait(job["id"], timeout=30)["state"] == "stopped"

    log = served.get(f"/jobs/{job['id']}/log")
    assert log.status_code == 200, log.text
    assert log.headers["content-type"].startswith("text/plain")
    assert "epoch 0: train_loss " in log.text
    assert served.get(f"/jobs/{job['id']}/log", token=None).status_code == 401


def test_a_flood_of_output_is_rate_limited_and_counted(served: Served) -> None:
    lines = 3000
    with served.client() as api:
        job = api.submit({"program": {"name": "flood", "params": {"lines": lines}}})
        record = api.wait(job["id"], timeout=60)
        assert record["state"] == "completed", record
        logs = [e for e in _all_events(api, job["id"]) if e["type"] == "log"]

    floods = [e for e in logs if e["data"]["line"].startswith("flood line ")]
    summary = logs[-1]["data"]
    assert summary["stream"] == "trainbus" and "not sent as log events" in summary["line"]
    dropped_total = summary["dropped_total"]
    assert sum(e["data"].get("dropped", 0) for e in logs) == dropped_total
    printed = lines + 5  # the flood, the fd-level line, the subprocess's two, the long line
    # and the last line: each one was sent or counted
    assert len([e for e in logs if e["data"]["stream"] != "trainbus"]) + dropped_total == printed
    span = logs[-1]["time"] - logs[0]["time"]
    assert len(floods) <= LIMITS.burst_lines + LIMITS.lines_per_second * span + 2
    assert dropped_total >= lines - LIMITS.burst_lines - LIMITS.lines_per_second * span - 2
    for event in logs:
        assert len(event["data"]["line"]) <= LIMITS.max_line_chars

    text = served.get(f"/jobs/{job['id']}/log").text.splitlines()
    assert [line for line in text if line.startswith("flood line ")] == [
        f"flood line {index}" for index in range(lines)
    ]
    for line in ("written at the fd level", "from a subprocess", "its stderr", "the last line"):
        # two processes write the same fds: a line may follow another's unended bytes
        assert any(line in row for row in text), line
    assert "x" * 50_000 in text  # the file keeps the whole line; its event was cut


def test_a_program_that_raises_fails_with_its_traceback(served: Served) -> None:
    with served.client() as api:
        job = api.submit({"program": {"name": "fail"}})
        record = api.wait(job["id"], timeout=60)
    assert record["state"] == "failed", record
    error = record["error"]
    assert error["type"] == "ValueError"
    assert error["message"] == "the input column 'age' has strings in it"
    tail = error["stderr_tail"].splitlines()
    assert tail[-1] == "ValueError: the input column 'age' has strings in it"
    assert any("in fail" in line for line in tail) and any(
        "raise _broken_input()" in line for line in tail
    )
    log = served.get(f"/jobs/{job['id']}/log").text
    assert "about to fail" in log and "Traceback (most recent call last)" in log


@pytest.mark.parametrize(
    ("body", "where", "says"),
    [
        (
            {"program": {"name": "nope"}},
            ["body", "program", "name"],
            "unknown program 'nope'; available programs: crash, digits_loop, fail, flood, hang",
        ),
        (
            {"program": {"name": "digits_loop", "params": {"epochs": 0}}},
            ["body", "program", "params", "epochs"],
            "greater than or equal to 1",
        ),
        (
            {"program": {"name": "digits_loop", "params": {"script": "train.py"}}},
            ["body", "program", "params", "script"],
            "Extra inputs are not permitted",
        ),
        (
            {"program": {"name": "digits_loop"}, "model": {"name": "mlp"}},
            ["body", "model"],
            "Extra inputs are not permitted",
        ),
    ],
)
def test_an_unknown_program_or_bad_params_are_refused_with_what_to_fix(
    served: Served, body: dict[str, Any], where: list[str], says: str
) -> None:
    response = httpx.post(
        served.url + "/jobs", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 422, response.text
    details = response.json()["detail"]
    assert [d for d in details if d["loc"] == where and says in d["msg"]], details


def test_a_job_without_a_log_file_is_a_404_that_says_why(served: Served) -> None:
    response = served.get("/jobs/nosuchjob/log")
    assert response.status_code == 404
    with served.client() as api:
        job = api.submit({"model": {"name": "linear"}, "dataset": {"name": "iris"}, "epochs": 1})
        api.wait(job["id"], timeout=60)
    response = served.get(f"/jobs/{job['id']}/log")
    assert response.status_code == 404
    assert "built-in trainer" in response.json()["detail"]


def test_a_program_that_stands_still_is_reported_stalled_and_failed(served: Served) -> None:
    spec = {
        "program": {"name": "hang", "params": {"after_steps": 3}},
        "stall_timeout_seconds": 2.0,  # past a slow start (sklearn's import) under load
        "on_stall": "fail",
    }
    with served.client() as api:
        job = api.submit(spec)
        stream = api.stream(job["id"])
        stalled = _next(stream, "job_stalled")
        assert stalled["data"]["step"] == 3 and stalled["data"]["action"] == "fail"
        assert "in hang" in stalled["data"]["stack"]  # where the program stands
        failed = _next(stream, "job_failed")
    error = failed["data"]["error"]
    assert "stalled" in error["message"] and "SIGKILL" in error["message"], error
    assert "standing still" in served.get(f"/jobs/{job['id']}/log").text


def test_a_stop_the_program_does_not_reach_is_escalated(served: Served) -> None:
    with served.client() as api:
        job = api.submit({"program": {"name": "hang", "params": {"after_steps": 2}}})
        stream = api.stream(job["id"])
        _next(stream, "log", line="standing still")
        asked = time.monotonic()
        api.stop(job["id"])
        ended = _next(stream, "job_interrupted")
        waited = time.monotonic() - asked
        record = api.job(job["id"])
    # SIGTERM after the grace period: KeyboardInterrupt in the program, which ends resumable
    assert waited >= STOP_GRACE_SECONDS
    assert record["state"] == "interrupted", record
    assert "SIGTERM" in (ended["data"]["reason"] or ""), ended


def test_a_program_that_crashes_in_native_code_fails_with_how_it_died(served: Served) -> None:
    with served.client() as api:
        job = api.submit({"program": {"name": "crash"}})
        record = api.wait(job["id"], timeout=60)
    assert record["state"] == "failed", record
    error = record["error"]
    assert "SIGSEGV" in error["message"], error
    # faulthandler's report, past the captured fd 2, with the crashed thread's stack
    assert "Segmentation fault" in error["stderr_tail"], error
    assert "in crash" in error["stderr_tail"], error
    assert "in crash" in error["fatal_error"], error
    # written to fd 2 the moment before the crash: on disk, in the failure's tail
    assert "reading address 0" in error["stderr_tail"], error


def test_the_server_s_early_stopping_decides_on_a_program_s_epochs(served: Served) -> None:
    spec = {
        "program": {"name": "digits_loop", "params": {"epochs": 50}},
        "early_stop": {"enabled": True, "monitor": "val_loss", "patience": 0, "min_delta": 10.0},
    }
    with served.client() as api:
        job = api.submit(spec)
        record = api.wait(job["id"], timeout=60)
        events = _all_events(api, job["id"])
    assert record["state"] == "completed", record
    epochs = [e for e in events if e["type"] == "fit_epoch_end"]
    assert len(epochs) == 2, epochs  # the second epoch did not improve by min_delta
    decided = [e for e in events if e["type"] == "early_stop"]
    assert len(decided) == 1 and decided[0]["data"]["monitor"] == "val_loss", decided
