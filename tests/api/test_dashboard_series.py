"""The dashboard's server side: the public page with its CSP, metric series at a requested
resolution, and reading a YAML spec (a real server; the job side is a stand-in)."""

from __future__ import annotations

import re
import threading

import anyio
import httpx
import pytest

from trainbus.api._series import Series, downsample_min_max, extract, source_types
from trainbus.bus import Event, EventType

from .server import LiveServer


def test_downsampling_keeps_spikes_and_both_ends() -> None:
    count = 10_000
    y = [1.0] * count
    y[4321] = 100.0  # a spike
    y[7777] = -5.0  # a dip
    full = Series([float(i) for i in range(count)], y, [None] * count)
    small = downsample_min_max(full, 200)
    assert len(small.y) <= 200
    assert small.x[0] == 0 and small.x[-1] == count - 1
    assert 100.0 in small.y and -5.0 in small.y
    assert small.x == sorted(small.x)
    assert downsample_min_max(small, 500) is small  # already small enough: returned whole


def test_gpu_figures_are_read_from_resource_samples() -> None:
    gpus = [{"index": 0, "utilization_ratio": 0.5}, {"index": 1, "utilization_ratio": None}]
    samples = [
        Event("_server", 1, EventType.RESOURCE_SAMPLE, 10.0, {"gpus": gpus}),
        Event("_server", 2, EventType.RESOURCE_SAMPLE, 11.0, {"gpus": []}),
    ]
    assert source_types("gpu1.utilization_ratio") == {EventType.RESOURCE_SAMPLE}
    assert extract("gpu0.utilization_ratio", samples).to_dict() == {
        "x": [10.0],
        "y": [0.5],
        "epoch": [None],
    }
    assert extract("gpu1.utilization_ratio", samples).y == []  # not reported: no point


def test_downsampling_refuses_fewer_than_four_points() -> None:
    with pytest.raises(ValueError, match="at least 4"):
        downsample_min_max(Series([], [], []), 3)


def _publish_job(server: LiveServer, job_id: str, batches: int) -> int:
    bus = server.services.bus
    done = threading.Event()
    last: list[int] = []

    def run() -> None:
        for step in range(1, batches + 1):
            data = {"epoch": 0, "batch": step - 1, "step": step, "loss": 1 / step, "lr": 0.1}
            bus.publish(job_id, EventType.TRAIN_BATCH_END, data)
        for epoch in (0, 1):
            metrics = {"val_loss": 0.5 - epoch / 10, "val_accuracy": 0.8 + epoch / 10}
            data = {"epoch": epoch, "step": batches, "metrics": metrics}
            last.append(bus.publish(job_id, EventType.FIT_EPOCH_END, data).seq)
        done.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert done.wait(30)
    thread.join()
    return last[-1]


async def test_series_are_downsampled_to_the_requested_size(
    transport_server: LiveServer,
) -> None:
    last_seq = await anyio.to_thread.run_sync(_publish_job, transport_server, "series-job", 5000)
    async with httpx.AsyncClient(
        base_url=transport_server.url, headers=transport_server.headers
    ) as http:
        response = await http.get(
            "/jobs/series-job/series",
            params=[("metric", "loss"), ("metric", "val_loss"), ("points", "100")],
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["last_seq"] == last_seq
    loss = body["series"]["loss"]
    assert loss["total"] == 5000 and len(loss["x"]) <= 100
    assert loss["y"][0] == 1.0 and loss["x"][-1] == 5000  # both ends kept
    assert body["series"]["val_loss"] == {
        "x": [5000, 5000],
        "y": [0.5, 0.4],
        "epoch": [1, 2],
        "total": 2,
    }


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("metric=loss&points=3", 422),
        ("metric=bad%20name", 422),
        ("metric=&points=10", 422),
        (
            "metric=loss&metric=lr&metric=a&metric=b&metric=c&metric=d&metric=e&metric=f&metric=g",
            422,
        ),
    ],
)
async def test_series_refuses_bad_parameters(
    transport_server: LiveServer, query: str, status: int
) -> None:
    async with httpx.AsyncClient(
        base_url=transport_server.url, headers=transport_server.headers
    ) as http:
        response = await http.get(f"/jobs/series-job/series?{query}")
    assert response.status_code == status, response.text
    assert "detail" in response.json()


async def test_series_needs_the_token_and_a_known_job(transport_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=transport_server.url) as http:
        assert (await http.get("/jobs/series-job/series?metric=loss")).status_code == 401
        missing = await http.get(
            "/jobs/no-such-job/series?metric=loss", headers=transport_server.headers
        )
    assert missing.status_code == 404


async def test_the_page_and_its_assets_are_public_with_a_strict_policy(
    transport_server: LiveServer,
) -> None:
    async with httpx.AsyncClient(base_url=transport_server.url) as http:
        page = await http.get("/")
        script = await http.get("/dashboard/app.js", headers={"Accept-Encoding": "gzip"})
        unknown = await http.get("/dashboard/nothing.js")
        unknown_signed = await http.get("/dashboard/nothing.js", headers=transport_server.headers)
        api = await http.get("/jobs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in ("default-src 'self'", "script-src 'self'", "connect-src 'self'"):
        assert directive in policy
    assert "frame-ancestors 'none'" in policy and "unsafe" not in policy
    assert "<script" in page.text and "http://" not in page.text and "https://" not in page.text
    assert script.status_code == 200 and script.headers["content-encoding"] == "gzip"
    # only the shipped files are public: any other path still needs the token
    assert unknown.status_code == 401 and unknown_signed.status_code == 404
    assert api.status_code == 401  # the API itself still needs the token


async def test_a_yaml_spec_is_read_and_a_syntax_error_names_its_line(
    transport_server: LiveServer,
) -> None:
    async with httpx.AsyncClient(
        base_url=transport_server.url, headers=transport_server.headers
    ) as http:
        good = await http.post("/specs/parse", content="name: a\nepochs: 2\nmodel: {name: mlp}\n")
        broken = await http.post("/specs/parse", content="name: a\nmodel: [mlp\n")
        listed = await http.post("/specs/parse", content="- a\n- b\n")
        binary = await http.post("/specs/parse", content=b"\xff\xfe")
        bomb = await http.post("/specs/parse", content="a: &a [1, 1]\nb: [*a, *a]\n")
    assert good.json() == {"name": "a", "epochs": 2, "model": {"name": "mlp"}}
    assert broken.status_code == 422 and broken.json()["detail"][0]["line"] == 3
    assert listed.status_code == 422 and "mapping" in listed.json()["detail"][0]["msg"]
    assert binary.status_code == 422 and "UTF-8" in binary.json()["detail"][0]["msg"]
    assert bomb.status_code == 422 and "aliases" in bomb.json()["detail"][0]["msg"]


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("http://10.1.2.3:8000", 404),  # the server's own origin: let through (no such job)
        ("http://10.9.9.9:8000", 403),  # another origin
        ("http://10.1.2.3:9999", 403),  # another port is another origin
        ("http://[::1", 403),  # not an origin at all
    ],
)
async def test_the_dashboards_own_origin_may_change_state(
    transport_server: LiveServer, origin: str, status: int
) -> None:
    """Served at a name outside the Origin allowlist, the dashboard can still pause and stop
    jobs: an Origin naming the request's own (allowlisted) Host is the same origin."""
    headers = {**transport_server.headers, "Host": "10.1.2.3:8000", "Origin": origin}
    async with httpx.AsyncClient(base_url=transport_server.url) as http:
        response = await http.post("/jobs/no-such-job/pause", headers=headers)
    assert response.status_code == status, response.text


def test_every_file_the_page_names_is_served() -> None:
    from importlib import resources

    from trainbus.api._dashboard import public_paths

    page = (resources.files("trainbus.api") / "dashboard" / "index.html").read_text()
    named = set(re.findall(r'(?:href|src)="(/dashboard/[^"]+)"', page))
    assert named and named <= set(public_paths())
