"""WebSocket fan-out: 50 clients follow one job while events are published at 5,000/s.

The server (the real app, uvicorn on a free loopback port) runs in this process, so that a
thread can publish straight onto its bus for a synthetic job id; each event carries its
publish time. The clients run in a second process (they would otherwise compete with the
server for this process's interpreter): 50 healthy ones that read everything, and one that
connects and never reads. Healthy clients must receive every event in order; the one that
never reads must be dealt with (dropped, then closed with code 4008) without holding anyone
back. Last line: one JSON object.
"""

from __future__ import annotations

# isort: split

import argparse
import asyncio
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

JOB = "bench-fanout"
FIRST_SEQ = 2  # seq 1 is the job_queued event that makes the job known before clients join
_SEQ = re.compile(r'"seq":(\d+)')
_SENT = re.compile(r'"data":\{"t":([0-9.e+-]+)')


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the client process -------------------------------------------------------------------


async def _healthy(
    url: str, token: str, total: int, ready: asyncio.Event, connected: list[int]
) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    latencies: list[float] = []
    expected = FIRST_SEQ
    out_of_order = 0
    gaps = 0
    async with connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
        max_size=None,
        proxy=None,
        ping_interval=None,
    ) as ws:
        connected[0] += 1
        if connected[0] == connected[1]:
            ready.set()
        extend = latencies.extend
        now = time.time
        find_seqs = _SEQ.findall
        find_times = _SENT.findall
        while expected < FIRST_SEQ + total:
            message = await ws.recv()
            received = now()
            # Two C-speed scans instead of json.loads: one process reads for every client on
            # a small machine, and building 250,000 dicts a second would measure the client.
            # Events are `{"job_id":..,"seq":N,"type":..,"time":..,"data":{"t":T,...}}`.
            if '"type":"gap"' in message:
                gaps += message.count('"type":"gap"')
            seqs = [int(x) for x in find_seqs(message)]
            if seqs != list(range(expected, expected + len(seqs))):
                out_of_order += 1
            expected = seqs[-1] + 1
            extend([received - float(t) for t in find_times(message)])
    return {
        "received": len(latencies),
        "latencies": latencies,
        "out_of_order": out_of_order,
        "gaps": gaps,
    }


def _established(sock: Any) -> bool:
    """True while the TCP connection is open (Linux ``TCP_INFO``; elsewhere always True)."""
    info = getattr(socket, "TCP_INFO", None)
    if info is None:  # pragma: no cover - not Linux
        return True
    try:
        return bool(sock.getsockopt(socket.IPPROTO_TCP, info, 1)[0] == 1)  # TCP_ESTABLISHED
    except OSError:
        return False


async def _stalled(url: str, token: str, done: asyncio.Event, linger: float) -> dict[str, Any]:
    """Connect, then never read (websockets stops reading the socket once 1 message waits).

    Once the healthy clients are done it stays connected until the server lets it go, or
    ``linger`` seconds (the server's bound for such a client) have passed."""
    from websockets.asyncio.client import connect

    ws = await connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        compression=None,
        max_size=None,
        max_queue=1,
        proxy=None,
        ping_interval=None,
    )
    await done.wait()
    sock = ws.transport.get_extra_info("socket")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + linger
    # the kernel's connection state has no event to wait on: poll it
    while loop.time() < deadline and _established(sock):  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    ws.transport.abort()
    return {}


async def _clients(
    url: str, token: str, clients: int, total: int, stalled_client: bool, linger: float
) -> dict[str, Any]:
    ready = asyncio.Event()
    done = asyncio.Event()
    connected = [0, clients]
    stalled = asyncio.create_task(
        _stalled(url, token, done, linger) if stalled_client else asyncio.sleep(0)
    )
    tasks = [
        asyncio.create_task(_healthy(url, token, total, ready, connected)) for _ in range(clients)
    ]
    await ready.wait()
    print("READY", flush=True)
    results = await asyncio.gather(*tasks)
    done.set()
    await stalled
    return {
        "received": [r["received"] for r in results],
        "out_of_order": sum(r["out_of_order"] for r in results),
        "gaps": sum(r["gaps"] for r in results),
        # a sorted sample of every 10th latency keeps the pipe small with many processes
        "latencies": sorted(x for r in results for x in r["latencies"][::10]),
    }


# -- the server process -------------------------------------------------------------------


class PeakRss:
    """Samples this process's resident memory."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _publish(bus: Any, rate: float, seconds: float) -> tuple[int, float]:
    """Publish ``rate`` events per second for ``seconds``, paced against the clock."""
    from trainbus.bus import EventType

    total = int(rate * seconds)
    publish = bus.publish
    kind = EventType.TRAIN_BATCH_END
    started = time.perf_counter()
    sent = 0
    while sent < total:
        due = min(total, int((time.perf_counter() - started) * rate) + 1)
        while sent < due:
            sent += 1
            publish(JOB, kind, {"t": time.time(), "step": sent, "loss": 0.5})
        time.sleep(0.0005)
    return sent, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rate", type=float, default=5000.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(5, (os.cpu_count() or 2) // 3)),
        help="processes the healthy clients are spread over (default: by CPU count)",
    )
    parser.add_argument("--stalled", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stalled-linger", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--client-process", nargs=2, metavar=("URL", "TOKEN"), help=argparse.SUPPRESS
    )
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.client_process:
        url, token = args.client_process
        result = asyncio.run(
            _clients(url, token, args.clients, args.total, args.stalled, args.stalled_linger)
        )
        print(json.dumps(result), flush=True)
        return

    import httpx
    import uvicorn

    from trainbus.api import Settings, create_app, uvicorn_config
    from trainbus.api._server import listening_socket

    total = int(args.rate * args.seconds)
    with tempfile.TemporaryDirectory() as data_dir, PeakRss() as rss:
        settings = Settings(
            host="127.0.0.1",
            port=_free_port(),
            data_dir=Path(data_dir),
            token="bench-token-0123456789",
            log_level="warning",
        )
        app = create_app(settings)
        config = uvicorn_config(app, settings)
        server = uvicorn.Server(config)
        # the socket `trainbus serve` listens on (each connection's send buffer capped)
        sockets = [listening_socket(config, settings)]
        thread = threading.Thread(target=server.run, kwargs={"sockets": sockets}, daemon=True)
        thread.start()
        base = f"http://127.0.0.1:{settings.port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200 and server.started:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        from trainbus.bus import EventType

        services = app.state.services
        services.bus.publish(JOB, EventType.JOB_QUEUED, {"name": "synthetic fan-out job"})
        # The per-job stream: live events, with anything a client's buffer had to drop
        # refilled from the event store, so a healthy but briefly starved client loses nothing.
        url = (
            f"ws://127.0.0.1:{settings.port}/jobs/{JOB}/events/ws"
            f"?after_seq={FIRST_SEQ - 1}&types=train_batch_end"
        )
        # how long the server may take to let a never-reading client go: a send it does not
        # take, the close frame it does not take, the drop after that (and a second of slack)
        bound = settings.ws_send_timeout + 2 * settings.ws_close_timeout + 1.0
        shares = [args.clients // args.client_processes] * args.client_processes
        for i in range(args.clients % args.client_processes):
            shares[i] += 1
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--clients",
                    str(share),
                    "--total",
                    str(total),
                    *(["--stalled", "--stalled-linger", str(bound)] if i == 0 else []),
                    "--client-process",
                    url,
                    settings.token.get_secret_value(),
                ],  # type: ignore[union-attr]
                stdout=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONPATH": os.getcwd()},
            )
            for i, share in enumerate(shares)
        ]
        for process in processes:
            assert process.stdout is not None
            if process.stdout.readline().strip() != "READY":
                raise SystemExit("the clients did not connect")
        services = app.state.services
        import psutil

        me = psutil.Process()
        them = [psutil.Process(p.pid) for p in processes]
        cpu_before = sum(me.cpu_times()[:2]), sum(sum(t.cpu_times()[:2]) for t in them)
        published, elapsed = _publish(services.bus, args.rate, args.seconds)
        cpu_after = sum(me.cpu_times()[:2]), sum(sum(t.cpu_times()[:2]) for t in them)
        parts = [
            json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in processes
        ]
        latencies = sorted(x for part in parts for x in part["latencies"])
        result = {
            "received": [n for part in parts for n in part["received"]],
            "gaps": sum(part["gaps"] for part in parts),
            "out_of_order": sum(part["out_of_order"] for part in parts),
            "p50_ms": 1000 * latencies[len(latencies) // 2],
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)],
            "max_ms": 1000 * latencies[-1],
        }
        hub = services.hub.statistics()
        waits = {
            sub.name: round(sub.publisher_wait_seconds, 3)
            for sub in services.bus.statistics().subscriptions
            if sub.publisher_wait_seconds > 0
        }
        server.should_exit = True
        thread.join(timeout=60)
    received = result["received"]
    lost = sum(published - n for n in received) + result["gaps"] + result["out_of_order"]
    print(f"published {published} events in {elapsed:.2f} s to {args.clients} clients + 1 stalled")
    print(
        f"received per client: min {min(received)} max {max(received)}; "
        f"gaps {result['gaps']}, out of order {result['out_of_order']}"
    )
    print(
        f"latency publish->receipt: p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms, "
        f"max {result['max_ms']:.2f} ms"
    )
    print(f"hub: {hub.as_dict()}")
    print(f"publisher waited for lossless subscribers (s): {waits or 'never'}")
    server_cpu = cpu_after[0] - cpu_before[0]
    client_cpu = cpu_after[1] - cpu_before[1]
    print(
        f"CPU while publishing: server {server_cpu / elapsed:.0%}, clients "
        f"{client_cpu / elapsed:.0%} in {args.client_processes} processes (100% = one core; "
        f"{os.cpu_count()} cores)"
    )
    # Latency here is mostly CPU the server and the clients could not get: on a shared machine,
    # read p99 next to the load the other processes put on it.
    load = os.getloadavg()
    print(f"load average (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    ru_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"server peak RSS {rss.peak / 2**20:.1f} MiB (ru_maxrss {ru_peak_mb:.1f} MiB)")
    print(
        json.dumps(
            {
                "bench": "fanout",
                "clients": args.clients,
                "events_per_s": round(published / elapsed, 1),
                "p50_ms": round(result["p50_ms"], 2),
                "p99_ms": round(result["p99_ms"], 2),
                "lost": lost,
                "stalled_client_handled": hub.too_slow >= 1,
                "peak_rss_mb": round(rss.peak / 2**20, 1),
                "server_cpu": round(server_cpu / elapsed, 2),
                "clients_cpu": round(client_cpu / elapsed, 2),
                "load_1min": round(load[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
