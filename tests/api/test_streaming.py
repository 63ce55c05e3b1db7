"""WebSocket streaming through the hub: order, seams, filters, slow clients."""

from __future__ import annotations

import json
import random
import socket
import threading
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from trainbus.api import CLOSE_TOO_SLOW
from trainbus.api._hub import EventHub
from trainbus.bus import EventBus, EventType

from .fakes import FakeJobs
from .server import LiveServer


def _publish(
    server: LiveServer,
    job_id: str,
    n: int,
    type: EventType = EventType.TRAIN_BATCH_END,
    done: threading.Event | None = None,
) -> threading.Thread:
    bus = server.services.bus

    def run() -> None:
        for i in range(n):
            bus.publish(job_id, type, {"i": i})
        if done is not None:
            done.set()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


async def _receive(socket: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
    with anyio.fail_after(timeout):
        payload = json.loads(await socket.recv())
    return payload if isinstance(payload, list) else [payload]


async def _collect_until(socket: Any, last_seq: int, timeout: float = 30.0) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with anyio.fail_after(timeout):
        while not events or events[-1]["seq"] < last_seq:
            events.extend(await _receive(socket, timeout))
    return events


async def _drain(socket: Any) -> None:
    while True:
        await socket.recv()


def _connect(server: LiveServer, path: str, **kwargs: Any) -> Any:
    return connect(
        server.ws_url + path,
        additional_headers=server.headers,
        compression=None,
        proxy=None,
        **kwargs,
    )


async def test_live_events_arrive_in_order_without_gaps(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("live-1")
    async with _connect(transport_server, "/jobs/live-1/events/ws") as socket:
        thread = _publish(transport_server, "live-1", 500)
        events = await _collect_until(socket, 500)
        thread.join()
    assert [e["seq"] for e in events] == list(range(1, 501))
    assert {e["type"] for e in events} == {"train_batch_end"}


async def test_replay_then_live_has_no_gap_or_duplicate_at_the_seam(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("seam-1")
    _publish(transport_server, "seam-1", 300).join()
    done = threading.Event()
    thread = _publish(transport_server, "seam-1", 300, done=done)
    async with _connect(transport_server, "/jobs/seam-1/events/ws?after_seq=100") as socket:
        events = await _collect_until(socket, 600)
    thread.join()
    assert [e["seq"] for e in events] == list(range(101, 601))


async def test_big_events_come_in_messages_a_default_client_accepts(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    # 1,500 events of ~1.1 kB: a page of replay (1,000 events) would be a 1.1 MB message, over
    # the 1 MiB a websockets client takes by default; the server cuts it at 256 KiB
    fake_jobs.add("big-1")
    bus = transport_server.services.bus
    for _ in range(1500):
        bus.publish("big-1", EventType.TRAIN_BATCH_END, {"pad": "é" * 500})  # 2 bytes each
    store = transport_server.services.history
    assert store is not None and await store.wait_for("big-1", 1500)
    sizes: list[int] = []
    seqs: list[int] = []
    async with _connect(transport_server, "/jobs/big-1/events/ws") as socket:
        with anyio.fail_after(30):
            while not seqs or seqs[-1] < 1500:
                message = await socket.recv()
                sizes.append(len(message.encode()))
                payload = json.loads(message)
                seqs.extend(e["seq"] for e in (payload if isinstance(payload, list) else [payload]))
    assert seqs == list(range(1, 1501))
    assert max(sizes) <= transport_server.services.settings.ws_max_message_bytes
    assert len(sizes) >= 6  # 1.65 MB of events in messages of at most 256 KiB


async def test_types_filter(transport_server: LiveServer, fake_jobs: FakeJobs) -> None:
    fake_jobs.add("types-1")
    async with _connect(
        transport_server, "/jobs/types-1/events/ws?types=fit_epoch_end,on_train_end"
    ) as socket:
        bus = transport_server.services.bus
        for _ in range(3):
            bus.publish("types-1", EventType.TRAIN_BATCH_END, {})
        bus.publish("types-1", EventType.FIT_EPOCH_END, {"epoch": 0})
        bus.publish("types-1", EventType.TRAIN_END, {})
        events = await _collect_until(socket, 5)
    assert [(e["seq"], e["type"]) for e in events] == [(4, "fit_epoch_end"), (5, "train_end")]


async def test_reconnecting_client_sees_each_event_once_in_order(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("flaky-1")
    total = 3000
    rng = random.Random(7)
    done = threading.Event()
    thread = _publish(transport_server, "flaky-1", total, done=done)
    seen: list[int] = []
    with anyio.fail_after(60):
        while not seen or seen[-1] < total:
            after = seen[-1] if seen else 0
            async with _connect(
                transport_server, f"/jobs/flaky-1/events/ws?after_seq={after}"
            ) as s:
                for _ in range(rng.randint(1, 6)):
                    for event in await _receive(s):
                        seen.append(event["seq"])
                    if seen[-1] >= total:
                        break
    thread.join()
    assert seen == list(range(1, total + 1))


async def test_unknown_job_and_bad_types_are_refused(transport_server: LiveServer) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as missing:
        async with _connect(transport_server, "/jobs/nope/events/ws"):
            pass
    assert missing.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as bad:
        async with _connect(transport_server, "/events/ws?types=not_a_type"):
            pass
    assert bad.value.response.status_code == 422
    assert b"not_a_type" in bad.value.response.body


async def test_slow_client_is_closed_with_the_seq_to_resume_from_others_unaffected(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("slow-1")
    bus = transport_server.services.bus
    padding = "x" * 1000  # big events fill the socket buffers of the client that never reads
    chunk, rounds = 50, 400  # chunks smaller than the 64-event client buffer
    received: list[dict[str, Any]] = []
    gave_up = threading.Event()
    transport_server.services.hub.too_slow_listeners.append(gave_up.set)
    async with (
        _connect(transport_server, "/jobs/slow-1/events/ws", max_queue=1) as slow,
        _connect(transport_server, "/events/ws") as healthy,
    ):
        for round_ in range(rounds):
            for _ in range(chunk):
                bus.publish("slow-1", EventType.TRAIN_BATCH_END, {"pad": padding})
            # a healthy client keeps up: it reads each chunk before the next one comes
            received.extend(await _collect_until(healthy, (round_ + 1) * chunk))
        # the server gives up on the slow client (it has read nothing); once it starts
        # reading it finds the close frame: 4008 and a resume point
        assert await anyio.to_thread.run_sync(gave_up.wait, 30)
        with anyio.fail_after(30), pytest.raises(ConnectionClosed) as closed:
            await _drain(slow)
    assert [e["seq"] for e in received] == list(range(1, chunk * rounds + 1))
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == CLOSE_TOO_SLOW
    assert "after_seq=" in closed.value.rcvd.reason
    assert transport_server.services.hub.statistics().too_slow >= 1


async def test_all_jobs_stream_refuses_after_seq_and_says_how_to_resume(
    transport_server: LiveServer,
) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as refused:
        async with _connect(transport_server, "/events/ws?after_seq=10"):
            pass
    assert refused.value.response.status_code == 422
    detail = json.loads(refused.value.response.body)["detail"]
    assert "live events only" in detail
    assert "/jobs/{job_id}/events/ws?after_seq=" in detail


async def test_all_jobs_stream_sends_live_events_only(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("live-only-1")
    bus = transport_server.services.bus
    async with _connect(transport_server, "/events/ws") as probe:
        bus.publish("live-only-1", EventType.TRAIN_START, {})
        # the probe has it: the hub has fanned it out before the second client joins
        assert [e["seq"] for e in await _receive(probe)] == [1]
        async with _connect(transport_server, "/events/ws") as socket:
            bus.publish("live-only-1", EventType.TRAIN_END, {})
            events = await _receive(socket)
    assert [(e["job_id"], e["seq"], e["type"]) for e in events] == [("live-only-1", 2, "train_end")]


async def test_deleting_a_job_closes_its_streams_with_4404(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    import httpx

    from trainbus.api._websocket import CLOSE_JOB_DELETED

    fake_jobs.add("doomed-1")
    fake_jobs.add("kept-1")
    bus = transport_server.services.bus
    bus.publish("doomed-1", EventType.JOB_COMPLETED, {})
    async with (
        _connect(transport_server, "/jobs/doomed-1/events/ws") as doomed,
        _connect(transport_server, "/jobs/kept-1/events/ws") as kept,
    ):
        assert [e["seq"] for e in await _receive(doomed)] == [1]
        async with httpx.AsyncClient(
            base_url=transport_server.url, headers=transport_server.headers
        ) as http:
            response = await http.delete("/jobs/doomed-1")
        assert response.status_code == 204
        with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await _drain(doomed)
        assert closed.value.rcvd is not None
        assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
            CLOSE_JOB_DELETED,
            "job deleted",
        )
        # the other job's stream goes on
        bus.publish("kept-1", EventType.TRAIN_START, {})
        assert [e["seq"] for e in await _receive(kept)] == [1]


async def test_a_job_deleted_while_its_stream_is_set_up_closes_it_with_4404(
    transport_server: LiveServer, fake_jobs: FakeJobs, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stream checks the job, then joins the hub; a delete in between (its streams were
    closed before this one joined) must still end it, not leave it waiting for ever."""
    import trainbus.api._websocket as websocket_module
    from trainbus.api._websocket import CLOSE_JOB_DELETED, close_job_streams

    fake_jobs.add("doomed-2")
    real_has_events = websocket_module.has_events
    calls = 0

    async def deleted_right_after_the_check(services: Any, job_id: str) -> bool:
        nonlocal calls
        calls += 1
        found = await real_has_events(services, job_id)
        if calls == 1:  # the delete lands between the check and joining the hub
            await services.jobs.delete(job_id)
            close_job_streams(services, job_id)
        return found

    monkeypatch.setattr(websocket_module, "has_events", deleted_right_after_the_check)
    async with _connect(transport_server, "/jobs/doomed-2/events/ws") as doomed:
        with anyio.fail_after(10), pytest.raises(ConnectionClosed) as closed:
            await _drain(doomed)
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (CLOSE_JOB_DELETED, "job deleted")


async def _publish_paced(
    server: LiveServer, job_id: str, healthy: Any, rounds: int, first_seq: int
) -> None:
    """Publish ``rounds`` chunks of 50 padded events; a healthy all-jobs client reads each."""
    bus = server.services.bus
    padding = "x" * 1000  # big events fill the socket buffers of a client that never reads
    seq = first_seq - 1
    for _ in range(rounds):
        for _ in range(50):
            bus.publish(job_id, EventType.TRAIN_BATCH_END, {"pad": padding})
        seq += 50
        await _collect_until(healthy, seq)


def _connect_never_reading(server: LiveServer, path: str) -> Any:
    """A client that reads nothing: a small receive buffer (no autotuning) and ``max_queue=1``
    (the client library stops reading the socket once a message waits)."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    tcp.setblocking(False)
    return _connect(server, path, max_queue=1, max_size=None, sock=tcp)


async def _read_until_closed(socket: Any) -> tuple[list[int], ConnectionClosed]:
    seqs: list[int] = []
    with anyio.fail_after(30):
        try:
            while True:
                payload = json.loads(await socket.recv())
                seqs.extend(e["seq"] for e in (payload if isinstance(payload, list) else [payload]))
        except ConnectionClosed as closed:
            return seqs, closed


async def test_a_slow_client_resumes_from_the_close_reason_without_loss_or_duplicate(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("resume-slow-1")
    gave_up = threading.Event()
    transport_server.services.hub.too_slow_listeners.append(gave_up.set)
    rounds = 200
    async with (
        _connect_never_reading(transport_server, "/jobs/resume-slow-1/events/ws") as slow,
        _connect(transport_server, "/events/ws?types=train_batch_end") as healthy,
    ):
        await _publish_paced(transport_server, "resume-slow-1", healthy, rounds, 1)
        assert await anyio.to_thread.run_sync(gave_up.wait, 30)
        before, closed = await _read_until_closed(slow)
    assert closed.rcvd is not None and closed.rcvd.code == CLOSE_TOO_SLOW
    after_seq = int(closed.rcvd.reason.rsplit("=", 1)[1])
    # the resume point is the last event the client actually got: nothing skipped
    assert before == list(range(1, after_seq + 1))
    async with _connect(
        transport_server, f"/jobs/resume-slow-1/events/ws?after_seq={after_seq}", max_size=None
    ) as resumed:
        rest = await _collect_until(resumed, rounds * 50)
    assert before + [e["seq"] for e in rest] == list(range(1, rounds * 50 + 1))


async def test_a_client_that_asks_for_history_and_never_reads_is_closed_too_slow(
    transport_server: LiveServer, fake_jobs: FakeJobs
) -> None:
    fake_jobs.add("history-slow-1")
    bus = transport_server.services.bus
    history = 8000  # 8 MB of stored events: more than the socket buffers take in
    for _ in range(history):
        bus.publish("history-slow-1", EventType.TRAIN_BATCH_END, {"pad": "x" * 1000})
    store = transport_server.services.history
    assert store is not None and await store.wait_for("history-slow-1", history)
    gave_up = threading.Event()
    transport_server.services.hub.too_slow_listeners.append(gave_up.set)
    async with (
        _connect_never_reading(transport_server, "/jobs/history-slow-1/events/ws") as slow,
        _connect(transport_server, "/events/ws?types=train_batch_end") as healthy,
    ):
        # live events flow while the replay waits on a client that reads nothing
        await _publish_paced(transport_server, "history-slow-1", healthy, 100, history + 1)
        assert await anyio.to_thread.run_sync(gave_up.wait, 30)
        before, closed = await _read_until_closed(slow)
    assert closed.rcvd is not None and closed.rcvd.code == CLOSE_TOO_SLOW
    assert before == list(range(1, int(closed.rcvd.reason.rsplit("=", 1)[1]) + 1))


class _Reservations:
    """A seq guard that reserves 10 seqs ahead, and refuses the jobs in ``refuse``."""

    def __init__(self) -> None:
        self.reserved: dict[str, int] = {}
        self.refuse: set[str] = set()

    def reserved_seq(self, job_id: str) -> int:
        return self.reserved.get(job_id, 0)

    def reserve(self, job_id: str, seq: int) -> None:
        if job_id in self.refuse:
            raise OSError("disk I/O error")
        self.reserved[job_id] = seq + 10


async def test_the_hub_sends_no_seq_before_it_is_reserved_and_reports_refused_ones_as_gaps() -> (
    None
):
    guard = _Reservations()
    async with EventBus() as bus, anyio.create_task_group() as group:
        hub = EventHub(bus, batch_interval=0.0)
        hub.seq_guard = guard
        await group.start(hub.run)
        client = hub.add(job_id=None, types=None, buffer_size=1000, max_lag=10_000)
        received: list[tuple[str, int]] = []
        missed: list[tuple[str, int, int, int]] = []
        for i in range(25):
            bus.publish("reserved", EventType.TRAIN_BATCH_END, {"i": i})
            await anyio.lowlevel.checkpoint()  # let the hub take them in several rounds
        guard.refuse.add("refused")
        for i in range(5):
            bus.publish("refused", EventType.TRAIN_BATCH_END, {"i": i})
        with anyio.fail_after(10):
            while len(received) < 25 or not missed:
                await client.wait()
                gaps, items = client.take(1000)
                missed.extend(gaps)
                for job_id, seq, _encoded in items:
                    # what a client holds was reserved before the hub handed it over
                    assert seq <= guard.reserved_seq(job_id), (job_id, seq, guard.reserved)
                    received.append((job_id, seq))
        hub.close()
    assert received == [("reserved", seq) for seq in range(1, 26)]
    assert missed == [("refused", 1, 5, 5)]
