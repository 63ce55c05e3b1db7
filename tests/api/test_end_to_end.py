"""End to end: a real server with the real job manager and subscribers, real small jobs."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import torch
from websockets.asyncio.client import connect

from trainbus.api import AsyncTrainbusClient, create_app
from trainbus.api.cli import main

from .fuzz import server_errors
from .server import LiveServer, make_settings, run_server

pytestmark = pytest.mark.slow


def digits_spec(epochs: int = 2, **overrides: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
        "dataset": {"name": "digits"},
        "epochs": epochs,
        "batch_size": 64,
        "seed": 0,
    }
    spec.update(overrides)
    return spec


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("data"), max_running_jobs=2)
    with run_server(create_app(settings), settings) as live:
        yield live


@pytest.fixture
async def client(server: LiveServer) -> Any:
    async with AsyncTrainbusClient(server.url, server.token) as api_client:
        yield api_client


def _ws(server: LiveServer, job_id: str, after_seq: int = 0, types: str | None = None) -> Any:
    query = f"?after_seq={after_seq}" + (f"&types={types}" if types else "")
    return connect(
        f"{server.ws_url}/jobs/{job_id}/events/ws{query}",
        additional_headers=server.headers,
        compression=None,
        proxy=None,
        max_size=None,
    )


async def _next_events(socket: Any, timeout: float = 60.0) -> list[dict[str, Any]]:
    with anyio.fail_after(timeout):
        payload = json.loads(await socket.recv())
    return payload if isinstance(payload, list) else [payload]


async def _until(socket: Any, types: set[str], timeout: float = 90.0) -> list[dict[str, Any]]:
    """Events up to and including the first one of ``types``."""
    events: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while True:
            for event in await _next_events(socket, timeout):
                events.append(event)
                if event["type"] in types:
                    return events


END = {"job_completed", "job_stopped", "job_failed"}


async def _all_events(api: AsyncTrainbusClient, job_id: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while True:
        page = await api.events(job_id, after_seq=events[-1]["seq"] if events else 0)
        if not page:
            return events
        events.extend(page)


async def test_every_event_over_websocket_through_completion(
    server: LiveServer, client: AsyncTrainbusClient
) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        created = await http.post("/jobs", json=digits_spec(epochs=2))
    assert created.status_code == 201, created.text
    job = created.json()
    assert created.headers["location"] == f"/jobs/{job['id']}"
    assert job["state"] in ("queued", "running") and job["spec"]["epochs"] == 2
    async with _ws(server, job["id"]) as socket:
        events = await _until(socket, END)
    assert events[-1]["type"] == "job_completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    types = [e["type"] for e in events]
    for expected in ("job_started", "train_start", "train_batch_end", "fit_epoch_end"):
        assert expected in types
    assert types.count("fit_epoch_end") == 2
    record = await client.wait(job["id"])
    assert record["state"] == "completed"
    stored = await client.events(job["id"], limit=10_000)
    assert [e["seq"] for e in stored][: len(events)] == [e["seq"] for e in events]
    assert any(c["name"] for c in await client.checkpoints(job["id"]))


async def test_pause_holds_resume_continues_stop_leaves_a_checkpoint(
    server: LiveServer, client: AsyncTrainbusClient, tmp_path: Path
) -> None:
    job = await client.submit(digits_spec(epochs=200, batch_size=16))
    async with _ws(server, job["id"]) as socket:
        await _until(socket, {"train_batch_end"})
        accepted = await client.pause(job["id"])
        assert accepted["command"] == "pause" and accepted["job_id"] == job["id"]
        paused = await _until(socket, {"job_paused"})
        assert paused[-1]["data"]["command_id"] == accepted["command_id"]
        assert (await client.job(job["id"]))["state"] == "paused"
        # while paused, nothing of the training loop arrives: a bounded wait on the socket
        held: list[dict[str, Any]] = []
        with anyio.move_on_after(1.5):
            while True:
                held.extend(await _next_events(socket))
        assert not [e for e in held if e["type"] in ("train_batch_end", "optimizer_step")]

        with pytest.raises(Exception, match="409"):
            await client.pause(job["id"])  # already paused
        await client.resume(job["id"])
        await _until(socket, {"job_resumed"})
        await _until(socket, {"train_batch_end"})  # training goes on

        await client.stop(job["id"])
        tail = await _until(socket, END)
    assert tail[-1]["type"] == "job_stopped"
    record = await client.wait(job["id"])
    assert record["state"] == "stopped"
    checkpoints = await client.checkpoints(job["id"])
    assert checkpoints, "a stopped job leaves a checkpoint"
    name = checkpoints[0]["name"]
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        download = await http.get(f"/jobs/{job['id']}/checkpoints/{name}")
        assert download.status_code == 200
        (tmp_path / "state.pt").write_bytes(download.content)
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        assert isinstance(state, dict)
        missing = await http.get(f"/jobs/{job['id']}/checkpoints/not-a-listed-name")
        assert missing.status_code == 404
        assert (await http.post(f"/jobs/{job['id']}/pause")).status_code == 409


async def test_save_and_set_lr_are_acknowledged_with_their_step(
    server: LiveServer, client: AsyncTrainbusClient
) -> None:
    job = await client.submit(digits_spec(epochs=200, batch_size=16))
    async with _ws(server, job["id"]) as socket:
        await _until(socket, {"train_batch_end"})
        saved = await client.save(job["id"])
        assert saved["command"] == "save"
        events = await _until(socket, {"checkpoint_saved"})
        acknowledged = [e for e in events if e["data"].get("command_id") == saved["command_id"]]
        assert acknowledged and acknowledged[0]["type"] == "model_save"
        save_step = acknowledged[0]["data"]["step"]
        assert events[-1]["data"]["step"] == save_step

        changed = await client.set_lr(job["id"], 0.0123)
        events = await _until(socket, {"lr_changed"})
        assert events[-1]["data"]["command_id"] == changed["command_id"]
        assert events[-1]["data"]["lr"] == pytest.approx(0.0123)
        lr_step = events[-1]["data"]["step"]
        after = await _until(socket, {"train_batch_end"})
        assert after[-1]["data"]["step"] > lr_step >= save_step
        assert after[-1]["data"]["lr"] == pytest.approx(0.0123)

        async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
            for body in ({"value": -1}, {"value": "fast"}, {}, {"value": 0.1, "extra": 1}):
                refused = await http.post(f"/jobs/{job['id']}/set_lr", json=body)
                assert refused.status_code == 422, (body, refused.text)
        await client.stop(job["id"])
        await _until(socket, END)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        ended = await http.post(f"/jobs/{job['id']}/save")
        assert ended.status_code == 409 and "running" in ended.json()["detail"]


async def test_reconnecting_at_random_points_sees_each_event_once_in_order(
    server: LiveServer, client: AsyncTrainbusClient
) -> None:
    job = await client.submit(digits_spec(epochs=2, batch_size=32))
    rng = random.Random(3)
    seen: list[dict[str, Any]] = []
    with anyio.fail_after(120):
        while not seen or seen[-1]["type"] not in END:
            after = seen[-1]["seq"] if seen else 0
            async with _ws(server, job["id"], after_seq=after) as socket:
                for _ in range(rng.randint(1, 8)):
                    seen.extend(await _next_events(socket))
                    if seen[-1]["type"] in END:
                        break
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    stored = await client.events(job["id"], limit=10_000)
    assert [e["seq"] for e in stored] == [e["seq"] for e in seen]


async def test_client_stream_follows_a_job(client: AsyncTrainbusClient) -> None:
    job = await client.submit(digits_spec(epochs=1))
    events = [
        event async for event in client.stream(job["id"], types=["fit_epoch_end", "job_completed"])
    ]
    assert [e["type"] for e in events] == ["fit_epoch_end", "job_completed"]


async def test_spec_sections_wire_the_controllers(server: LiveServer) -> None:
    """early_stop and lr_plateau from the spec act on the job through the control channel."""
    spec = digits_spec(
        epochs=6,
        early_stop={"enabled": True, "patience": 2, "min_delta": 100.0},
        lr_plateau={"enabled": True, "patience": 0, "min_delta": 100.0, "factor": 0.5},
        checkpoint={"keep_last": 2, "every_n_epochs": 1},
    )
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        job = (await http.post("/jobs", json=spec)).json()
    async with _ws(
        server,
        job["id"],
        types="lr_changed,early_stop,job_stopping,fit_epoch_end,"
        "checkpoint_saved,job_completed,job_stopped,job_failed",
    ) as socket:
        events = await _until(socket, END)
    types = [e["type"] for e in events]
    assert "lr_changed" in types and "early_stop" in types
    assert types.count("fit_epoch_end") < 6, "early stopping ended the job before its epochs"
    assert "checkpoint_saved" in types


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"dataset": {"name": "digits"}}, "model"),
        (digits_spec(epochs=0), "epochs"),
        (digits_spec(batch_size="many"), "batch_size"),
        (digits_spec(model={"name": "no-such-model"}), "model"),
        (digits_spec(dataset={"name": "../../etc/passwd"}), "dataset"),
        (digits_spec(unexpected_field=1), "unexpected_field"),
    ],
)
async def test_bad_specs_are_422_naming_the_field(
    server: LiveServer, spec: dict[str, Any], field: str
) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        before = (await http.get("/jobs")).json()["total"]
        response = await http.post("/jobs", json=spec)
        after = (await http.get("/jobs")).json()["total"]
    assert response.status_code == 422, response.text
    assert field in json.dumps(response.json()["detail"])
    assert before == after


async def test_list_filter_paginate_delete(server: LiveServer, client: AsyncTrainbusClient) -> None:
    job = await client.submit(digits_spec(epochs=1))
    await client.wait(job["id"])
    page = await client.jobs(state="completed", limit=1)
    assert page["limit"] == 1 and page["offset"] == 0 and len(page["items"]) == 1
    assert page["total"] >= 1 and all(j["state"] == "completed" for j in page["items"])
    await client.delete(job["id"])
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        assert (await http.get(f"/jobs/{job['id']}")).status_code == 404
        assert (await http.get(f"/jobs/{job['id']}/events")).status_code == 404


async def test_deleting_a_running_job_is_409(client: AsyncTrainbusClient) -> None:
    job = await client.submit(digits_spec(epochs=200, batch_size=16))
    await client.wait(job["id"], states={"running"})
    with pytest.raises(Exception, match="409"):
        await client.delete(job["id"])
    await client.stop(job["id"])
    await client.wait(job["id"])


def test_metrics_pass_promtool(server: LiveServer) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (make test installs it)")
    text = httpx.get(server.url + "/metrics").text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, text=True, capture_output=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_metrics_registry_readyz(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        metrics = await http.get("/metrics")  # no token needed by default
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert "trainbus" in metrics.text
        assert "trainbus_websocket_clients" in metrics.text
        registry = await http.get("/registry", headers=server.headers)
        assert registry.status_code == 200
        assert "digits" in json.dumps(registry.json()["datasets"])
        assert "mlp" in json.dumps(registry.json()["models"])
        ready = await http.get("/readyz", headers=server.headers)
        assert ready.status_code == 200


def test_generated_requests_against_the_real_job_side(server: LiveServer) -> None:
    """Schemathesis on the real server; POST /jobs is fuzzed against the stand-in job side
    (tests/api/test_openapi.py), since valid specs here would start real training runs."""
    job = httpx.post(server.url + "/jobs", json=digits_spec(epochs=1), headers=server.headers)
    assert job.status_code == 201
    failures = server_errors(
        server,
        max_examples=5,
        include=lambda operation: (
            not (operation.method.upper() == "POST" and operation.path == "/jobs")
        ),
    )
    assert failures == []


async def test_shutdown_interrupts_running_jobs_which_resume_after_a_restart(
    tmp_path: Path,
) -> None:
    """SIGTERM-style shutdown: the job is checkpointed and paused, comes back `interrupted`
    with its seq numbering intact, and resumes to completion from its checkpoint."""
    data = tmp_path / "data"
    settings = make_settings(data)
    with run_server(create_app(settings), settings) as first:
        async with AsyncTrainbusClient(first.url, first.token) as api:
            job = await api.submit(digits_spec(epochs=60, batch_size=64))  # outlasts the shutdown
            async with _ws(first, job["id"]) as socket:
                await _until(socket, {"fit_epoch_end"})
        # leaving the block shuts the server down as SIGTERM does (uvicorn's should_exit)
    settings = make_settings(data)
    with run_server(create_app(settings), settings) as second:
        async with AsyncTrainbusClient(second.url, second.token) as api:
            record = await api.job(job["id"])
            assert record["state"] == "interrupted"
            assert record["checkpoint"], "the shutdown left a checkpoint"
            before = await _all_events(api, job["id"])
            assert before[-1]["type"] == "job_interrupted"
            await api.resume(job["id"])
            async with _ws(second, job["id"], after_seq=before[-1]["seq"]) as socket:
                tail = await _until(socket, END, timeout=120)
            assert tail[-1]["type"] == "job_completed"
            assert tail[0]["seq"] == before[-1]["seq"] + 1, "numbering continues after restart"
            epochs = [e["data"]["epoch"] for e in tail if e["type"] == "fit_epoch_end"]
            assert epochs and epochs[0] > 0, "resumed from the checkpoint, not from scratch"


def test_cli_submit_watch_status_jobs(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    spec = tmp_path / "job.json"
    spec.write_text(json.dumps(digits_spec(epochs=2)))
    base = ["--url", server.url, "--token", server.token]
    assert main([*base, "submit", str(spec), "--watch"]) == 0
    out = capsys.readouterr().out
    job_id = out.split()[1]
    assert "completed" in out and "2/2" in out  # the epoch bar filled up
    assert main([*base, "status", job_id, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "completed"
    assert main([*base, "jobs", "--state", "completed"]) == 0
    assert job_id in capsys.readouterr().out


async def test_server_resource_samples_are_streamable(server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers) as http:
        response = await http.get("/jobs/_server/events", params={"types": "resource_sample"})
    assert response.status_code == 200
    assert all(event["type"] == "resource_sample" for event in response.json())


def test_a_checkpoint_is_a_ready_model(
    server: LiveServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``best`` and ``latest`` resolve over HTTP and are marked in the listing; the download
    (or the folder) becomes a model with its preprocessing; ``trainbus predict`` uses it."""
    from sklearn.datasets import load_digits

    from trainbus.api import TrainbusClient
    from trainbus.worker import load_model

    with TrainbusClient(server.url, server.token) as api:
        job_id = api.submit(digits_spec(epochs=3))["id"]
        assert api.wait(job_id, timeout=120)["state"] == "completed"
        listing = api.checkpoints(job_id)
        assert [c["latest"] for c in listing].count(True) == 1
        assert [c["best"] for c in listing].count(True) == 1
        assert listing[0]["latest"]  # newest first
        best = next(c["name"] for c in listing if c["best"])
        by_alias = api.download_checkpoint(job_id, "best", tmp_path / "best.pt")
        by_name = api.download_checkpoint(job_id, best, tmp_path / "named.pt")
        assert by_alias.read_bytes() == by_name.read_bytes()
        api.download_checkpoint(job_id, "latest", tmp_path / "latest.pt")

    digits = load_digits()
    model = load_model(by_alias)
    predicted = model.predict(digits.data)
    truth = [str(label) for label in digits.target]
    accuracy = sum(p == t for p, t in zip(predicted, truth, strict=True)) / len(truth)
    assert accuracy > 0.8, accuracy
    folder = server.app.state.settings.data_dir / "jobs" / job_id / "checkpoints" / best
    assert load_model(folder).predict(digits.data[:50]) == predicted[:50]

    rows = tmp_path / "rows.csv"
    header = ",".join(f"pixel_{i}" for i in range(64))
    rows.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in digits.data[:20]))
    assert main(["predict", job_id, str(rows), "--url", server.url, "--token", server.token]) == 0
    assert capsys.readouterr().out.split() == predicted[:20]
    assert main(["checkpoints", job_id, "--url", server.url, "--token", server.token]) == 0
    listed = capsys.readouterr().out
    assert "latest" in listed and "best" in listed
