"""SIGKILL a real ``trainbus serve`` process at random moments of a job's life, restart it on
the same data folder, and check what a user relies on after each crash: the job comes back
``interrupted``, its stored history is intact and gap-free, its checkpoint pointers name
complete checkpoints, resume continues from the newest one, and the job ends with exactly
the weights of a run of the same spec that was never killed.
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch

from trainbus.api import TrainbusClient, create_app
from trainbus.subscribers import list_checkpoints, load_checkpoint, verify_checkpoint

from ..api.server import make_settings, run_server
from ._kill_server import Server, ServerZygote, all_events, live_events
from .conftest import poll, record, sized, unfinished_checkpoint_entries

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TOKEN = "server-kill-token-0123456789"
SEED = int(os.environ.get("TRAINBUS_KILL_SEED", "20261130"))  # printed and recorded
KILLS = sized(4, 50)
MOMENTS = ("batch", "epoch_end", "checkpoint_write")
LIVE = "train_start,fit_epoch_end,job_completed"  # what the test follows on the live stream
SPEC: dict[str, Any] = {
    "name": "killed-again-and-again",
    # ~1 MB checkpoints; dropout draws random numbers every step, so a resume that does not
    # restore the random state ends with other weights
    "model": {"name": "mlp", "params": {"hidden_sizes": [256, 256], "dropout": 0.2}},
    "dataset": {"name": "digits"},
    "optimizer": {"name": "adam", "lr": 0.001},
    # each kill lands within about two epochs of the run's start; the rest runs at the end
    "epochs": 2 * KILLS + 8,
    "batch_size": 32,
    "seed": 11,
    "device": "cpu",
    "torch_threads": 1,
}


def _temporary_entries(job_dir: Path) -> list[str]:
    try:
        return sorted(e.name for e in os.scandir(job_dir / "checkpoints") if e.name[:5] == ".tmp-")
    except FileNotFoundError:
        return []


def _next_live(live: Iterator[dict[str, Any]], event_type: str) -> dict[str, Any]:
    """The next event of ``event_type`` on the job's live stream."""
    for event in live:
        if event["type"] == event_type:
            return event
    raise AssertionError(f"the job's stream ended before a {event_type} event")


def _kill_at(
    moment: str,
    rng: random.Random,
    live: Iterator[dict[str, Any]],
    zygote: ServerZygote,
    server: Server,
    job_dir: Path,
    epoch_seconds: float,
) -> dict[str, Any]:
    """Wait for a moment of the given kind, SIGKILL the server then; say what was going on."""
    if moment == "batch":  # anywhere within the next one and a half epochs
        delay = rng.uniform(0.0, 1.5 * epoch_seconds)
        time.sleep(delay)  # the random kill moment itself, not a synchronisation
    elif moment == "epoch_end":  # just after the trainer reported an epoch
        _next_live(live, "fit_epoch_end")
        delay = rng.uniform(0.0, 0.03)
        time.sleep(delay)  # the random kill moment itself, not a synchronisation
    else:  # while a checkpoint (or a pointer) is being written or old ones deleted
        delay = 0.0
        _poll(lambda: _temporary_entries(job_dir), "a checkpoint write to start")
    zygote.kill(server)
    return {"moment": moment, "delay": round(delay, 4), "temporary": _temporary_entries(job_dir)}


def _assert_history_intact(
    events: list[dict[str, Any]], seen: dict[int, dict[str, Any]], kill: int
) -> None:
    # Seqs may jump only where a crash lost reserved seqs, and a stored gap names them.
    previous = 0
    for event in events:
        seq = event["seq"]
        if seq != previous + 1:
            assert event["type"] == "gap", f"kill {kill}: seqs {previous + 1}..{seq - 1} missing"
            named = (event["data"]["from_seq"], event["data"]["to_seq"])
            assert named == (previous + 1, seq - 1), f"kill {kill}: {event} after {previous}"
        previous = seq
    by_seq = {event["seq"]: event for event in events}
    changed = [seq for seq, event in seen.items() if by_seq.get(seq) != event]
    assert not changed, f"kill {kill}: events read before the crash changed or vanished: {changed}"


def _assert_record_intact(
    after: dict[str, Any], before: dict[str, Any], job_dir: Path, kill: int
) -> None:
    assert after["state"] == "interrupted", f"kill {kill}: {after}"
    for field in ("id", "name", "spec", "created_at"):
        assert after[field] == before[field], f"kill {kill}: the record's {field} changed"
    assert (after["epoch"], after["step"]) >= (before["epoch"], before["step"]), (
        f"kill {kill}: the record lost progress it had stored: {before} -> {after}"
    )
    listed = {info.name for info in list_checkpoints(job_dir)}
    assert after["checkpoint"] is None or after["checkpoint"] in listed, (
        f"kill {kill}: the record names checkpoint {after['checkpoint']!r}, "
        f"which is not on disk (there: {sorted(listed)})"
    )


def _pointer(job_dir: Path, which: str) -> str | None:
    """The checkpoint a pointer file names (the documented layout: ``latest.json``)."""
    try:
        return str(json.loads((job_dir / "checkpoints" / f"{which}.json").read_bytes())["name"])
    except FileNotFoundError:
        return None


def _assert_pointers_complete(job_dir: Path, kill: int) -> int:
    """Both pointers name checkpoints that verify; return the step resume must start from."""
    for which in ("latest", "best"):
        if _pointer(job_dir, which) is not None:
            verify_checkpoint(job_dir, which)  # raises if the files differ from the manifest
    if _pointer(job_dir, "latest") is None:
        assert not list_checkpoints(job_dir), f"kill {kill}: checkpoints but no latest pointer"
        return 0
    return verify_checkpoint(job_dir, "latest").step


def _final_model(job_dir: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(job_dir, "latest")  # verified, torch.load(weights_only=True)
    model: dict[str, torch.Tensor] = state["model"]
    return model


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing_durable_and_resumes_exactly(
    tmp_path: Path,
) -> None:
    rng = random.Random(SEED)
    plan = [rng.choice(MOMENTS) for _ in range(KILLS)]
    print(f"seed {SEED}: kill moments {plan}")
    data_dir, reference_dir = tmp_path / "data", tmp_path / "reference"
    started = time.monotonic()
    zygote = ServerZygote(TOKEN, tmp_path / "servers.log")
    try:
        zygote.wait_warm()
        reference = zygote.serve(reference_dir)  # its own process: it shares no RNG state
        with reference.client() as client:
            reference_id = client.submit(SPEC)["id"]
        server = zygote.serve(data_dir)
        with server.client() as client:
            job_id = client.submit(SPEC)["id"]
        job_dir = data_dir / "jobs" / job_id
        seen: dict[int, dict[str, Any]] = {}  # seq -> the event as read before a kill
        epoch_seconds, resume_step, run_after = 0.2, 0, 0
        kills: list[dict[str, Any]] = []
        for kill, moment in enumerate(plan, 1):
            # The live stream (not the store, which may lag under load) says when the run
            # trains and when an epoch ends.
            with (
                server.client() as client,
                live_events(client, job_id, run_after, LIVE) as live,
            ):
                run = _next_live(live, "train_start")
                assert run["data"]["step"] == resume_step, (
                    f"kill {kill}: the run started at step {run['data']['step']}, "
                    f"the newest complete checkpoint is at step {resume_step}"
                )
                # one page of what is new (paging to the end could chase a training job)
                newer = client.events(job_id, after_seq=max(seen, default=0), limit=10_000)
                seen.update((e["seq"], e) for e in newer)
                before = client.job(job_id)
                moment_rng = random.Random(rng.random())
                happened = _kill_at(
                    moment, moment_rng, live, zygote, server, job_dir, epoch_seconds
                )
            server = zygote.serve(data_dir)
            happened["restart_seconds"] = round(server.ready_seconds, 3)
            with server.client() as client:
                interrupted = _poll(
                    partial(client.events, job_id, after_seq=run["seq"], types="job_interrupted"),
                    "the restarted server to store job_interrupted",
                )[0]
                _assert_record_intact(client.job(job_id), before, job_dir, kill)
                events = all_events(client, job_id)
                _assert_history_intact(events, seen, kill)
                epochs = [
                    e for e in events if e["seq"] > run["seq"] and e["type"] == "fit_epoch_end"
                ]
                if len(epochs) >= 2:
                    epoch_seconds = (epochs[-1]["time"] - epochs[0]["time"]) / (len(epochs) - 1)
                resume_step = _assert_pointers_complete(job_dir, kill)
                # no completed step is lost: the worker saved its state at its last step and
                # the restarted server stored the events no server had confirmed
                trained = [e["data"]["step"] for e in events if e["type"] == "train_batch_end"]
                assert trained == list(range(1, len(trained) + 1)), f"kill {kill}: steps differ"
                assert not trained or trained[-1] == resume_step, (
                    f"kill {kill}: steps {resume_step + 1}..{trained[-1]} were trained and lost"
                )
                client.resume(job_id)
                run_after = interrupted["seq"]
            happened.update(kill=kill, events=len(events), resume_step=resume_step)
            kills.append(happened)
            print(happened)
        with server.client() as client:
            final = client.wait(job_id, timeout=120, interval=0.05)
            assert final["state"] == "completed", final
            events = all_events(client, job_id)
            _assert_history_intact(events, seen, KILLS + 1)
            ends = [e["type"] for e in events if e["type"] in ("job_interrupted", "job_completed")]
            assert ends == ["job_interrupted"] * KILLS + ["job_completed"]
        with reference.client() as client:
            expected = client.wait(reference_id, timeout=120, interval=0.05)
            assert expected["state"] == "completed", expected
        assert final["step"] == expected["step"]
        learned = ("train_loss", "val_loss", "val_accuracy")
        assert {k: final["metrics"][k] for k in learned} == {
            k: expected["metrics"][k] for k in learned
        }
        killed_model = _final_model(job_dir)
        never_killed = _final_model(reference_dir / "jobs" / reference_id)
        assert killed_model.keys() == never_killed.keys()
        differing = [k for k in killed_model if not torch.equal(killed_model[k], never_killed[k])]
        assert not differing, f"after {KILLS} kills these tensors differ: {differing}"
        unfinished = unfinished_checkpoint_entries(job_dir)
        assert not unfinished, f"unfinished checkpoint files were left behind: {unfinished}"
    finally:
        zygote.close()
    record(
        "server_kill",
        seed=SEED,
        kills=KILLS,
        moments={m: plan.count(m) for m in MOMENTS},
        killed_during_write=sum(bool(k["temporary"]) for k in kills),
        resume_steps=[k["resume_step"] for k in kills],
        events=len(events),
        steps=final["step"],
        restart_seconds_max=max(k["restart_seconds"] for k in kills),
        restart_seconds_mean=round(sum(k["restart_seconds"] for k in kills) / KILLS, 3),
        final_weights_equal=True,
        seconds=round(time.monotonic() - started, 1),
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("crashed_state", "after_restart"), [("running", "interrupted"), ("completed", "completed")]
)
def test_a_record_left_naming_a_deleted_checkpoint_is_put_right_at_restart(
    tmp_path: Path, crashed_state: str, after_restart: str
) -> None:
    """A crash between checkpoint retention and the job record learning the newer name (the
    test above hit it) leaves the record of a running job, or of one that had just finished,
    naming a deleted checkpoint; the restarted server names the newest complete one instead."""
    data_dir = tmp_path / "data"
    spec = {**SPEC, "epochs": 2, "model": {"name": "mlp", "params": {"hidden_sizes": [16]}}}
    settings = make_settings(data_dir)
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
    ):
        job_id = client.submit(spec)["id"]
        assert client.wait(job_id, timeout=60, interval=0.05)["state"] == "completed"
    latest = verify_checkpoint(data_dir / "jobs" / job_id, "latest").name
    with closing(sqlite3.connect(data_dir / "trainbus.db")) as db, db:  # what the crash left
        db.execute(
            "UPDATE jobs SET state = ?, checkpoint = ? WHERE id = ?",
            (crashed_state, "epoch-0000-step-00000045", job_id),  # deleted by retention
        )
    settings = make_settings(data_dir)
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
    ):
        record = client.job(job_id)
    assert record["state"] == after_restart
    assert record["checkpoint"] == latest


def _poll(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    """Polls faster than the default: a kill must land close to the moment it waits for."""
    return poll(condition, what, timeout, interval=0.002)
