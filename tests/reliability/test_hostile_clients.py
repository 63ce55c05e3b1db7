"""Slow and hostile WebSocket clients against a real ``trainbus serve`` process.

While a real job trains, clients that never read, clients that send garbage (binary junk,
invalid JSON, messages past the server's 4 KiB limit) and a flood of hundreds of connections
hit the server. What must hold:

- abusive connections are closed with the proper code (1003 binary, 1008 text, 1009 too big,
  4008 too slow, with the ``after_seq`` the client actually got up to);
- the server's resident memory (VmRSS of the process, sampled every 20 ms) grows less than
  :data:`RSS_BOUND_MIB` over its peak without hostile clients;
- the job's throughput while the attack holds drops less than 5%. The server runs on one CPU
  of its own and the test's clients (the attackers) on the others, as an attacker on another
  machine would: what the server spends on hostile clients is then taken from its training
  thread's share of that CPU. The figure bounded is that share (the training thread's CPU time
  over the wall time, read from ``/proc/PID/task/TID/schedstat``) over the epochs that start
  once the attack's connections are all made, best of :data:`RUNS` runs each way, interleaved.
  It counts whatever the server does for the attackers and any wait they cause the training
  thread, and none of the machine's own drift: on a 2-core VM, quiet jobs' median epoch times
  wander by 20-50% from run to run (0.10-0.16 s), so an epoch-time comparison of 3 quiet runs
  against 3 other quiet runs "found" a slowdown over 5% 4 times in 10, while the share of quiet
  runs stays within 0.928-0.941. The epoch times are recorded too. The connection storm itself
  (about 1.3 ms of server CPU per handshake) and the whole-job times are recorded, not bounded;
- well-behaved clients following the same job receive every event, in order, within
  :data:`MAX_LATENCY` seconds.

Both the quiet and the hostile runs have the same two well-behaved followers; the flood's
connections wait for the job's end (``types`` = the terminal events), as CI scripts and
dashboards do, so the flood measures the cost of holding connections, not of fanning out to
them. The server caps each connection's kernel send buffer (``socket_send_buffer_bytes``,
256 KiB; left to itself Linux grows it to 4 MiB on loopback), so a never-reading client's sends
block after a few thousand events; the second test's job publishes ~26,000 events and checks
that the server lets go of such clients' connections in bounded time although they never read
(their close frame cannot reach them: they see 1006, or 4008 where it fitted), and that a slow
client that reads again gets 4008 with the seq of the last event it got. Before the cap the
three never-reading clients cost this job 5.8-6.5% of its throughput on a quiet 2-core machine
(2.5-3.4% with it).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import socket as socket_module
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
import psutil
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import free_port

from .conftest import record, sized

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmRSS from /proc"),
]

TOKEN = "hostile-test-token-42"
SERVE = (sys.executable, "-m", "trainbus.api.cli", "serve")
TERMINAL = ("job_completed", "job_stopped", "job_failed")
RUNS = sized(3, 5)
FLOOD = sized(300, 1000)
NEVER_READING = sized(3, 20)
GARBAGE_ROUNDS = sized(5, 50)
FOLLOWERS = 2
RSS_BOUND_MIB = 64.0
SAMPLE_SECONDS = 0.02
"""How often the server's memory and its threads' CPU times are read."""
"""Most the server's VmRSS may grow under attack (the peak over the quiet runs' peak)."""
MAX_SLOWDOWN = 0.05
MAX_LATENCY = 2.0
"""Seconds a well-behaved client may wait for an event (publish to receipt, worst case)."""
MAX_LAG = 1000
"""The server's ``ws_max_lag`` here: small, so that never-reading clients pass it in time."""
CLOSE_TIMEOUT = 5.0
"""The server's ``ws_close_timeout`` (its default): how long it waits to queue a close frame
for a client, and how long after that it keeps a connection it is done with open."""
FREED_WITHIN = 2 * CLOSE_TIMEOUT + 5.0
"""Seconds within which the server must hold no connection of a never-reading client once the
last of them was marked too slow (its two waits, plus slack for a busy 2-core machine)."""
JOB = {
    "model": {"name": "mlp", "params": {"hidden_sizes": [256, 256]}},
    "dataset": {"name": "digits"},
    "epochs": sized(16, 48),
    "batch_size": 16,
    "seed": 0,
    "torch_threads": 1,
    "checkpoint": {"enabled": False},
}
EVENTFUL_JOB = {
    "model": {"name": "mlp", "params": {"hidden_sizes": [16]}},
    "dataset": {"name": "digits"},
    "epochs": sized(4, 8),
    "batch_size": 1,
    "seed": 0,
    "torch_threads": 1,
    "checkpoint": {"enabled": False},
}
"""Many events a second (one batch per sample): more than the kernel's socket buffers (up to
4 MiB on loopback) absorb, so that a client that never reads falls ``MAX_LAG`` behind."""


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://")

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}"}

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS line")


def _cpus() -> tuple[int | None, set[int]]:
    """A CPU for the server alone and the others for the clients (None: only one CPU here)."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, set(cpus)
    return cpus[0], set(cpus[1:])


@contextlib.contextmanager
def _serve(data_dir: Path, cpu: int | None = None) -> Iterator[Server]:
    port = free_port()
    process = subprocess.Popen(
        [*SERVE, "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"],
        env={
            **os.environ,
            "TRAINBUS_TOKEN": TOKEN,
            "TRAINBUS_WS_MAX_LAG": str(MAX_LAG),
            "TRAINBUS_WS_BUFFER_SIZE": "256",
            "TRAINBUS_WS_CLOSE_TIMEOUT": str(CLOSE_TIMEOUT),
        },
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if cpu is not None:
        # Popen returns once the child has exec'd, before Python starts any thread: every
        # thread the server starts inherits this.
        os.sched_setaffinity(process.pid, {cpu})
    server = Server(process, f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, "the server exited during start-up"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(server.url + "/readyz", headers=server.headers).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.05)  # polling interval while waiting for readiness, bounded above
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _server_peer_ports(server: Server) -> set[int]:
    """The client ports of the TCP connections the server process holds open (its socket
    file descriptors, looked up in the kernel's connection table)."""
    pid = server.process.pid
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[2].rsplit(":", 1)[1], 16))
    return ports


_TICK = 1 / os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(server_pid: int) -> dict[str, float]:
    """CPU seconds each thread of the server and of its worker processes (where jobs train,
    on the server's CPU: they inherit its affinity) has run: the scheduler's own count (ns)
    where the kernel keeps it, else user plus system time (clock ticks) from ``stat``."""
    seconds = {}
    pids = [server_pid]
    with contextlib.suppress(psutil.Error):
        pids += [child.pid for child in psutil.Process(server_pid).children(recursive=True)]
    for pid, tid in [(p, t) for p in pids for t in _tasks(p)]:
        task = Path(f"/proc/{pid}/task/{tid}")
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            try:
                seconds[f"{pid}/{tid}"] = int((task / "schedstat").read_text().split()[0]) / 1e9
            except FileNotFoundError:
                if not task.exists():
                    raise
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                seconds[f"{pid}/{tid}"] = (int(fields[11]) + int(fields[12])) * _TICK
    return seconds


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []  # a worker process that has ended


class ServerSampler:
    """Samples the server's VmRSS and its threads' CPU times while the block runs."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.peak = 0.0
        self.cpu: list[tuple[float, dict[str, float]]] = []
        """(time.time(), thread -> CPU seconds) every :data:`SAMPLE_SECONDS`."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.server.rss_mib())
        self.cpu.append((time.time(), _thread_cpu_seconds(self.server.process.pid)))

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(SAMPLE_SECONDS):
                return

    def training_share(self, start: float, end: float) -> float:
        """The share of the wall time from ``start`` to ``end`` that the busiest thread of the
        server and its workers (the training thread) ran, between the first and last samples
        inside it."""
        inside = [(at, threads) for at, threads in self.cpu if start <= at <= end]
        assert len(inside) >= 10, "too few samples in the window"
        (first_at, before), (last_at, after) = inside[0], inside[-1]
        busiest = max(after[tid] - before.get(tid, 0.0) for tid in after)
        return busiest / (last_at - first_at)

    def __enter__(self) -> ServerSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _connect(server: Server, path: str, **options: Any) -> Any:
    return connect(
        server.ws_url + path,
        additional_headers=server.headers,
        compression=None,
        proxy=None,
        open_timeout=60,
        **options,
    )


async def _events(socket: ClientConnection, timeout: float = 60.0) -> list[dict[str, Any]]:
    with anyio.fail_after(timeout):
        payload = json.loads(await socket.recv())
    return payload if isinstance(payload, list) else [payload]


@dataclass
class Follower:
    """A well-behaved client: reads every event of the job until its end."""

    seqs: list[int] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    times: dict[str, float] = field(default_factory=dict)
    ended: anyio.Event = field(default_factory=anyio.Event)
    epochs: dict[int, list[float]] = field(default_factory=dict)
    """Epoch -> [train_epoch_start time, train_epoch_end time] (the server's clock)."""
    resumed: int = 0
    """Times it was closed as too slow (4008) and resumed where the server said."""

    def median_epoch_seconds(self, first: int) -> float:
        """The median training time of epochs ``first`` onwards (a burst of outside load on
        the shared machine moves the median less than the sum)."""
        return statistics.median(
            end - start for e, (start, end) in self.epochs.items() if e >= first
        )

    async def follow(self, server: Server, job_id: str, started: anyio.Event) -> None:
        path = f"/jobs/{job_id}/events/ws"
        while True:
            try:
                async with _connect(server, path, max_size=None) as socket:
                    started.set()
                    await self._read(socket)
                    return
            except ConnectionClosed as closed:
                # a client that fell behind (the test's own attackers share its event loop
                # and the machine's two cores) is closed with 4008 and where to resume, and
                # resumes there, as the SDK's and the dashboard's clients do
                received = closed.rcvd
                if received is None or received.code != 4008:
                    raise
                self.resumed += 1
                path = f"/jobs/{job_id}/events/ws?after_seq={received.reason.rsplit('=', 1)[1]}"

    async def _read(self, socket: ClientConnection) -> None:
        while True:
            events = await _events(socket)
            received = time.time()
            for event in events:
                self.seqs.append(event["seq"])
                self.latencies.append(received - event["time"])
                self.times.setdefault(event["type"], event["time"])
                if event["type"] in ("train_epoch_start", "train_epoch_end"):
                    self.epochs.setdefault(event["data"]["epoch"], []).append(event["time"])
            if events[-1]["type"] in TERMINAL:
                self.ended.set()
                return


async def _eventually(check: Callable[[], Awaitable[bool]], timeout: float = 100.0) -> None:
    """Wait, with a deadline, for a condition only the server process can tell."""
    with anyio.fail_after(timeout):
        while not await check():  # noqa: ASYNC110 - the state lives in another process
            await anyio.sleep(0.05)


@dataclass
class Attack:
    """The hostile clients of one run and what the server answered them."""

    expect_too_slow: bool = False
    """Never-reading clients wait for the server to give up on them (else they just vanish)."""
    close_codes: dict[str, list[int]] = field(default_factory=dict)
    flood: int = 0
    flood_connected: int = 0
    flood_connected_at: float = 0.0
    """When the last flood connection was open (time.time(), the server's clock too)."""
    flood_saw_end: int = 0
    garbage_done_at: float = 0.0
    """When the last garbage connection was closed (time.time())."""
    too_slow_reasons: list[str] = field(default_factory=list)
    garbage_rounds: int = 0
    never_reading: int = 0
    never_reading_ports: list[int] = field(default_factory=list)
    freed_after_s: float | None = None
    """Seconds from the last never-reading client marked too slow to the server holding none
    of their connections (measured while they still do not read)."""
    slow_reader: bool = False
    """Also run one client that stops reading, falls behind, then reads again: it must see the
    4008 close frame with a resume point equal to the last event it got."""
    slow_reader_seqs: list[int] = field(default_factory=list)
    slow_reader_close: tuple[int | None, str] = (None, "")

    @property
    def set_up_at(self) -> float:
        """When the attack's connections were all made: the flood's open, the junk's done."""
        return max(self.flood_connected_at, self.garbage_done_at)

    async def garbage(self, server: Server, job_id: str, kind: str, message: str | bytes) -> None:
        for _ in range(self.garbage_rounds):
            async with _connect(server, f"/jobs/{job_id}/events/ws", max_size=None) as socket:
                await socket.send(message)
                with anyio.fail_after(30), contextlib.suppress(ConnectionClosed):
                    while True:
                        await socket.recv()
                assert socket.close_code is not None
                self.close_codes.setdefault(kind, []).append(socket.close_code)
        self.garbage_done_at = max(self.garbage_done_at, time.time())

    async def never_read(self, server: Server, job_id: str, given_up: anyio.Event) -> None:
        """Stop reading at once; once ``given_up`` is set, read what is left (the close)."""
        # A small receive buffer (a client on a slow link) and max_queue=1 (the client library
        # stops reading the socket once a message waits): the server's sends soon block.
        tcp = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_STREAM)
        tcp.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096)
        tcp.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        tcp.setblocking(False)
        self.never_reading_ports.append(tcp.getsockname()[1])
        async with _connect(server, f"/jobs/{job_id}/events/ws", max_queue=1, sock=tcp) as ws:
            await given_up.wait()
            if not self.expect_too_slow:
                ws.transport.abort()
                return
            with anyio.fail_after(30), contextlib.suppress(ConnectionClosed):
                while True:
                    await ws.recv()
            self.close_codes.setdefault("never_reading", []).append(ws.close_code or -1)
            self.too_slow_reasons.append(ws.close_reason or "")

    async def read_late(
        self, server: Server, http: httpx.AsyncClient, job_id: str, marked: float
    ) -> None:
        """Stop reading until the server has marked every hostile reader too slow (its slow-
        client counter reaches ``marked``), then read everything until the server closes.

        (How many events that takes depends on how many the buffers on the way absorb: about
        3,000 when the trainer published one event at a time, over 5,400 once it published
        them in bulk every 0.1 s, so the test waits for the server's verdict, not a count.)
        """
        tcp = socket_module.socket(socket_module.AF_INET, socket_module.SOCK_STREAM)
        tcp.setsockopt(socket_module.SOL_SOCKET, socket_module.SO_RCVBUF, 4096)
        tcp.connect(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
        tcp.setblocking(False)
        async with _connect(server, f"/jobs/{job_id}/events/ws", max_queue=1, sock=tcp) as ws:
            with anyio.fail_after(100):
                while await _slow_clients_closed(http) < marked:  # noqa: ASYNC110 (/metrics)
                    await anyio.sleep(0.05)
            # within ws_close_timeout of being marked: the close frame is still on its way
            with anyio.fail_after(30), contextlib.suppress(ConnectionClosed):
                while True:
                    self.slow_reader_seqs += [event["seq"] for event in await _events(ws)]
            self.slow_reader_close = (ws.close_code, ws.close_reason or "")

    async def flood_connections(self, server: Server, job_id: str, release: anyio.Event) -> None:
        limit = anyio.Semaphore(50)  # handshakes in flight at once
        path = f"/jobs/{job_id}/events/ws?types={','.join(TERMINAL)}"

        async def hold() -> None:
            async with limit:
                ws = await _connect(server, path).__aenter__()
            try:
                self.flood_connected += 1
                if self.flood_connected == self.flood:
                    self.flood_connected_at = time.time()
                events = await _events(ws, timeout=120)
                if events[-1]["type"] in TERMINAL:
                    self.flood_saw_end += 1
                await release.wait()
            finally:
                await ws.close()

        async with anyio.create_task_group() as group:
            for _ in range(self.flood):
                group.start_soon(hold)

    async def run(
        self,
        server: Server,
        http: httpx.AsyncClient,
        job_id: str,
        followers: list[Follower],
    ) -> None:
        """Attack while the followers follow ``job_id``; returns once they have all ended."""
        release, given_up = anyio.Event(), anyio.Event()
        closed = await _slow_clients_closed(http)
        hostile: list[Callable[[], Coroutine[Any, Any, None]]] = [
            lambda: self.flood_connections(server, job_id, release),
            lambda: self.garbage(server, job_id, "binary", b"\x00\xffjunk" * 8),
            lambda: self.garbage(server, job_id, "invalid_json", '{"oops": '),
            lambda: self.garbage(server, job_id, "huge", "x" * 65_536),
        ]
        hostile += [lambda: self.never_read(server, job_id, given_up)] * self.never_reading
        if self.slow_reader:
            everyone = closed + self.never_reading + 1
            hostile.append(lambda: self.read_late(server, http, job_id, everyone))
        async with anyio.create_task_group() as attackers:
            for start in hostile:
                attackers.start_soon(start)
            with anyio.fail_after(100):
                for follower in followers:
                    await follower.ended.wait()
            release.set()
            if self.expect_too_slow:

                async def all_closed() -> bool:
                    return await _slow_clients_closed(http) >= closed + self.never_reading + (
                        1 if self.slow_reader else 0
                    )

                await _eventually(all_closed)
                # The server must let go of them in bounded time although they still do not
                # read (their buffers are full: the close frame cannot reach them).
                marked = time.monotonic()
                ports = set(self.never_reading_ports)

                async def all_freed() -> bool:
                    return not (_server_peer_ports(server) & ports)

                await _eventually(all_freed, timeout=FREED_WITHIN)
                self.freed_after_s = time.monotonic() - marked
            given_up.set()


async def _slow_clients_closed(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith("trainbus_websocket_slow_clients_closed_total"):
            return float(line.split()[-1])
    raise AssertionError("no slow-client counter on /metrics")


async def _run_job(
    server: Server, http: httpx.AsyncClient, job: dict[str, Any], attack: Attack | None
) -> tuple[float, list[Follower], ServerSampler]:
    """Run ``job`` with followers (and ``attack``); its train_start..train_end seconds, the
    followers and what was sampled of the server (peak RSS, CPU times)."""
    response = await http.post("/jobs", json=job)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    followers = [Follower() for _ in range(FOLLOWERS)]
    with ServerSampler(server) as sampler:
        async with anyio.create_task_group() as group:
            for follower in followers:
                started = anyio.Event()
                group.start_soon(follower.follow, server, job_id, started)
                await started.wait()
            if attack is not None:
                await attack.run(server, http, job_id, followers)
    times = followers[0].times
    return times["train_end"] - times["train_start"], followers, sampler


def _check_followers(followers: list[Follower]) -> tuple[float, float]:
    """Every event in order; the p99 and largest publish-to-receipt latency."""
    for follower in followers:
        assert follower.seqs == list(range(1, len(follower.seqs) + 1))
    latencies = sorted(x for f in followers for x in f.latencies)
    worst = latencies[-1]
    assert worst < MAX_LATENCY, f"a well-behaved client waited {worst:.2f} s for an event"
    return latencies[int(len(latencies) * 0.99)], worst


@pytest.fixture
def frozen_heap() -> Iterator[None]:
    """Keep the collector from re-scanning what the rest of the suite left in this process
    (full collections of it, on the clients' side, held up the followers in the hostile runs,
    which allocate more; before the server had a CPU of its own they took CPU from its
    training thread too)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server on a CPU of its own (where there are two) that has run one short job: torch,
    the dataset and the allocator are warm, so that memory and time measured afterwards are
    the clients' doing."""
    server_cpu, _ = _cpus()
    with _serve(tmp_path_factory.mktemp("data"), server_cpu) as live:
        response = httpx.post(
            live.url + "/jobs", json={**JOB, "epochs": 1}, headers=live.headers, timeout=30
        )
        assert response.status_code == 201, response.text
        job_url = f"{live.url}/jobs/{response.json()['id']}"
        deadline = time.monotonic() + 60
        while httpx.get(job_url, headers=live.headers).json()["state"] != "completed":
            assert time.monotonic() < deadline, "the warm-up job did not complete"
            time.sleep(0.05)  # polling the job's state, bounded above
        yield live


@pytest.fixture
def clients_off_the_server_cpu() -> Iterator[None]:
    """This thread (the clients' event loop) and the threads it starts run on the CPUs the
    server does not, as an attacker on another machine would."""
    server_cpu, others = _cpus()
    if server_cpu is None:
        pytest.skip("needs two CPUs (one for the server, one for its attackers); there is one")
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, others)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


@dataclass
class Run:
    """One job run of the throughput comparison."""

    seconds: float
    follower: Follower
    sampler: ServerSampler
    attack: Attack | None = None

    def training_share(self, first: int) -> float:
        """The training thread's share of the server's CPU from epoch ``first`` to the end."""
        start = self.follower.epochs[first][0]
        return self.sampler.training_share(start, self.follower.times["train_end"])


async def test_hostile_clients_neither_slow_the_job_nor_starve_others(
    server: Server, frozen_heap: None, clients_off_the_server_cpu: None
) -> None:
    started = time.monotonic()
    quiet: list[Run] = []
    hostile: list[Run] = []
    followers: list[Follower] = []
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http:
        for _ in range(RUNS):  # interleaved, so that a drift in machine load hits both
            seconds, quiet_followers, sampler = await _run_job(server, http, JOB, None)
            quiet.append(Run(seconds, quiet_followers[0], sampler))
            attack = Attack(flood=FLOOD, garbage_rounds=GARBAGE_ROUNDS, never_reading=NEVER_READING)
            seconds, hostile_followers, sampler = await _run_job(server, http, JOB, attack)
            hostile.append(Run(seconds, hostile_followers[0], sampler, attack))
            followers += quiet_followers + hostile_followers
        assert (await http.get("/healthz")).status_code == 200

        async def no_clients_left() -> bool:
            metrics = (await http.get("/metrics")).text
            return "trainbus_websocket_clients 0.0" in metrics.splitlines()

        await _eventually(no_clients_left, timeout=30)  # no connection left behind

    p99, worst = _check_followers(followers)
    attacks = [run.attack for run in hostile if run.attack is not None]
    for attack in attacks:
        assert set(attack.close_codes["binary"]) == {1003}
        assert set(attack.close_codes["invalid_json"]) == {1008}
        assert set(attack.close_codes["huge"]) == {1009}
        assert attack.flood_connected == attack.flood_saw_end == FLOOD
    rss_growth = max(run.sampler.peak for run in hostile) - max(run.sampler.peak for run in quiet)
    # Throughput while the attack holds: the epochs that started once the attack's connections
    # were all made (the same epochs of every run). The connection storm itself costs the
    # server a one-off ~1.3 ms of CPU per handshake; it is in the whole-job figures.
    first = max(
        min(e for e, (start, _) in run.follower.epochs.items() if start >= attack.set_up_at)
        for run, attack in zip(hostile, attacks, strict=True)
    )
    epochs = JOB["epochs"]
    assert isinstance(epochs, int) and first <= epochs // 2, "the attack outlasted half the job"

    quiet_share = [run.training_share(first) for run in quiet]
    hostile_share = [run.training_share(first) for run in hostile]
    slowdown = max(quiet_share) / max(hostile_share) - 1
    quiet_epochs = [run.follower.median_epoch_seconds(first) for run in quiet]
    hostile_epochs = [run.follower.median_epoch_seconds(first) for run in hostile]
    record(
        "hostile_clients",
        runs_each=RUNS,
        job=JOB,
        flood_connections=FLOOD,
        never_reading_clients=NEVER_READING,
        garbage_connections_per_kind=GARBAGE_ROUNDS,
        close_codes={k: sorted(set(v)) for k, v in attacks[0].close_codes.items()},
        job_seconds_quiet=[round(run.seconds, 3) for run in quiet],
        job_seconds_hostile=[round(run.seconds, 3) for run in hostile],
        whole_job_slowdown_best_of=round(
            min(run.seconds for run in hostile) / min(run.seconds for run in quiet) - 1, 4
        ),
        window_first_epoch=first,
        training_share_quiet=[round(x, 4) for x in quiet_share],
        training_share_hostile=[round(x, 4) for x in hostile_share],
        window_slowdown_best_of=round(slowdown, 4),
        slowdown_bound=MAX_SLOWDOWN,
        median_epoch_seconds_quiet=[round(x, 4) for x in quiet_epochs],
        median_epoch_seconds_hostile=[round(x, 4) for x in hostile_epochs],
        epoch_time_slowdown_best_of=round(min(hostile_epochs) / min(quiet_epochs) - 1, 4),
        rss_peak_mib_quiet=[round(run.sampler.peak, 1) for run in quiet],
        rss_peak_mib_hostile=[round(run.sampler.peak, 1) for run in hostile],
        rss_growth_mib=round(rss_growth, 1),
        rss_bound_mib=RSS_BOUND_MIB,
        follower_latency_p99_s=round(p99, 4),
        follower_latency_max_s=round(worst, 4),
        follower_resumed=[follower.resumed for follower in followers],
        wall_s=round(time.monotonic() - started, 1),
    )
    assert rss_growth < RSS_BOUND_MIB, f"RSS grew {rss_growth:.1f} MiB under attack"
    assert slowdown < MAX_SLOWDOWN, (
        f"under attack the training thread got {slowdown:.1%} less of the server's CPU "
        f"(best share quiet {max(quiet_share):.3f}, hostile {max(hostile_share):.3f})"
    )


async def test_clients_that_never_read_are_dropped_and_slow_readers_closed_4008(
    server: Server,
) -> None:
    started = time.monotonic()
    attack = Attack(expect_too_slow=True, never_reading=NEVER_READING, slow_reader=True)
    async with httpx.AsyncClient(base_url=server.url, headers=server.headers, timeout=30) as http:
        baseline = server.rss_mib()
        _, followers, sampler = await _run_job(server, http, EVENTFUL_JOB, attack)
    peak = sampler.peak
    p99, worst = _check_followers(followers)
    events = len(followers[0].seqs)
    record(
        "never_reading_clients",
        job=EVENTFUL_JOB,
        events=events,
        never_reading_clients=NEVER_READING,
        close_codes=sorted(set(attack.close_codes["never_reading"])),
        close_codes_count={
            str(code): attack.close_codes["never_reading"].count(code)
            for code in sorted(set(attack.close_codes["never_reading"]))
        },
        server_freed_all_after_s=round(attack.freed_after_s or -1, 2),
        freed_bound_s=FREED_WITHIN,
        slow_reader_close=list(attack.slow_reader_close),
        slow_reader_events=len(attack.slow_reader_seqs),
        rss_before_mib=round(baseline, 1),
        rss_peak_mib=round(peak, 1),
        rss_bound_mib=RSS_BOUND_MIB,
        follower_latency_p99_s=round(p99, 4),
        follower_latency_max_s=round(worst, 4),
        follower_resumed=[follower.resumed for follower in followers],
        wall_s=round(time.monotonic() - started, 1),
    )
    # A client that never reads cannot be expected to see the close frame: its buffers are
    # full, so the server drops the connection (1006 on the client's side) once it has waited
    # for them (FREED_WITHIN, asserted in Attack.run). Where the frame did get through (a
    # client marked while its buffers still had room), it must be 4008 with a resume point.
    # (This test used to expect 4008 from every one of them: it held only while all of them
    # were marked within ws_close_timeout of each other, as 3 are and 20 are not.)
    assert len(attack.close_codes["never_reading"]) == NEVER_READING
    assert set(attack.close_codes["never_reading"]) <= {4008, 1006}, attack.close_codes
    for code, reason in zip(
        attack.close_codes["never_reading"], attack.too_slow_reasons, strict=True
    ):
        if code == 4008:
            assert reason.startswith("too slow; resume with after_seq=")
            assert 0 < int(reason.rsplit("=", 1)[1]) <= events
    assert attack.freed_after_s is not None and attack.freed_after_s < FREED_WITHIN
    # A slow client that does read again gets the close frame: 4008, and the resume point is
    # exactly the last event it received (nothing lost, nothing to skip).
    code, reason = attack.slow_reader_close
    assert code == 4008, attack.slow_reader_close
    assert reason.startswith("too slow; resume with after_seq="), reason
    seqs = attack.slow_reader_seqs
    assert seqs and seqs == list(range(1, len(seqs) + 1))
    assert int(reason.rsplit("=", 1)[1]) == seqs[-1]
    assert peak - baseline < RSS_BOUND_MIB
