"""A seq a client was sent live never names another event, even across a SIGKILL.

The live stream sends events before the event store has committed them; a server killed in
between restarts with those seqs unstored. They must not be handed out again to other events
(a client resuming with ``after_seq`` would skip the new ones): the job's numbering continues
after them, and the stored history holds a ``gap`` that names the seqs lost in the crash.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from ._kill_server import ServerZygote, all_events
from .conftest import record

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

TOKEN = "seq-after-kill-token-0123456789"
KILLS = 1
MAX_KILLS = 8  # more if the first KILLS happened to find every live event stored already
LIVE_EVENTS = 400  # events followed live before each kill
# Each store write waits this long first (a real one commits in about a millisecond): the
# newest events streamed live are then seldom stored when the server dies.
STORE_DELAY = 0.05
SPEC: dict[str, Any] = {
    "name": "numbered-through-crashes",
    "model": {"name": "mlp", "params": {"hidden_sizes": [32]}},
    "dataset": {"name": "digits"},
    "epochs": 12,
    "batch_size": 16,
    "seed": 2,
    "device": "cpu",
    "torch_threads": 1,
}


def _whole(event: dict[str, Any]) -> tuple[Any, ...]:
    return (event["seq"], event["type"], event["time"], event["data"])


def _check_against_history(
    sent: dict[int, dict[str, Any]], stored: list[dict[str, Any]]
) -> tuple[int, list[dict[str, Any]]]:
    """Every seq sent live is stored as the same event or lies in a stored ``gap``; return
    how many were lost and the gaps."""
    by_seq = {event["seq"]: event for event in stored}
    gaps = [event for event in stored if event["type"] == "gap"]
    lost = 0
    for seq, event in sorted(sent.items()):
        kept = by_seq.get(seq)
        if kept is not None:
            assert _whole(kept) == _whole(event), f"seq {seq} now names another event"
            continue
        lost += 1
        assert any(g["data"]["from_seq"] <= seq <= g["data"]["to_seq"] for g in gaps), (
            f"seq {seq} was sent live, is not stored, and no gap names it"
        )
    return lost, gaps


def test_seqs_sent_live_are_never_reused_after_a_sigkill(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    zygote = ServerZygote(TOKEN, tmp_path / "servers.log")
    sent: dict[int, dict[str, Any]] = {}
    lost_per_kill = []
    try:
        zygote.wait_warm()
        server = zygote.serve(data_dir, store_delay=STORE_DELAY)
        with server.client() as client:
            job_id = client.submit(SPEC)["id"]
        for kill in range(MAX_KILLS):
            if kill >= KILLS and sum(lost_per_kill) > 0:
                break
            with server.client() as client:
                if kill:
                    client.resume(job_id)
                stream = client.stream(job_id, after_seq=max(sent, default=0), reconnect=False)
                followed = 0
                for event in stream:
                    if event["type"] != "gap":
                        sent[event["seq"]] = event
                        followed += 1
                    if followed >= LIVE_EVENTS:
                        break
                zygote.kill(server)  # at once, while the store lags behind the stream
                stream.close()
            server = zygote.serve(data_dir, store_delay=STORE_DELAY)
            with server.client() as client:
                assert client.job(job_id)["state"] == "interrupted"
                lost, gaps = _check_against_history(sent, all_events(client, job_id))
                lost_per_kill.append(lost)
        with server.client() as client:
            client.resume(job_id)
            final = client.wait(job_id, timeout=120, interval=0.05)
            assert final["state"] == "completed", final
            stored = all_events(client, job_id)
        lost, gaps = _check_against_history(sent, stored)
        seqs = [event["seq"] for event in stored]
        assert seqs == sorted(set(seqs)), "stored seqs are not unique and increasing"
    finally:
        zygote.close()
    record("seq_after_kill", kills=len(lost_per_kill), lost_per_kill=lost_per_kill, gaps=len(gaps))
    # The kills must have caught events sent but not stored, or nothing was tested.
    assert sum(lost_per_kill) > 0, lost_per_kill
