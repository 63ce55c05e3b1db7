"""Hostile input, by hand, against a real server with the real job
side and a real data folder.

Job specs that carry code, URLs, import paths or absurd sizes are refused with a 4xx naming the
field; bodies too large or too deep are refused without the server allocating them; ids and
names that try to leave their folder are refused on every route that takes one; symbolic links
planted in the data folder are not followed out of it. A sentinel file outside the data folder
is never read into a response, written or deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import create_app

from .conftest import record

BASE: dict[str, Any] = {"model": {"name": "mlp"}, "dataset": {"name": "iris"}, "epochs": 1}


@dataclass
class Sentinel:
    """A file outside the data folder that no request may read, write or delete."""

    path: Path
    content: bytes
    digest: str
    mtime_ns: int
    size: int

    @classmethod
    def plant(cls, path: Path) -> Sentinel:
        content = b"SENTINEL-" + secrets.token_hex(32).encode()
        path.write_bytes(content)
        stat = path.stat()
        return cls(
            path, content, hashlib.sha256(content).hexdigest(), stat.st_mtime_ns, len(content)
        )

    def assert_untouched(self) -> None:
        stat = self.path.stat()
        assert (stat.st_size, stat.st_mtime_ns) == (self.size, self.mtime_ns)
        assert hashlib.sha256(self.path.read_bytes()).hexdigest() == self.digest


@dataclass
class Hostile:
    server: LiveServer
    data_dir: Path
    outside: Path
    sentinel: Sentinel
    bodies: list[bytes] = field(default_factory=list)

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """A request with the token; every body it gets back is kept for the sentinel check."""
        headers = {**self.server.headers, **kwargs.pop("headers", {})}
        response = httpx.request(
            method, self.server.url + path, headers=headers, timeout=30, **kwargs
        )
        self.bodies.append(response.content)
        return response

    def raw(self, method: str, path: str) -> tuple[int, bytes]:
        """A request with ``path`` sent byte for byte (an HTTP client would normalise dot
        segments away); returns the status and the body."""
        host, port = self.server.url.removeprefix("http://").split(":")
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {self.server.token}\r\nContent-Length: 0\r\n"
            "Connection: close\r\n\r\n"
        )
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(head.encode())
            received = b""
            while chunk := connection.recv(65536):
                received += chunk
        status_line, _, rest = received.partition(b"\r\n")
        _, _, body = rest.partition(b"\r\n\r\n")
        self.bodies.append(body)
        return int(status_line.split()[1]), body

    def submit_raw(self, body: bytes) -> httpx.Response:
        return self.request(
            "POST", "/jobs", content=body, headers={"content-type": "application/json"}
        )

    def job_count(self) -> int:
        return int(self.request("GET", "/jobs").json()["total"])

    def wait_for_state(
        self, job_id: str, states: set[str], deadline: float = 60.0
    ) -> dict[str, Any]:
        stop_at = time.monotonic() + deadline
        while True:
            job = self.request("GET", f"/jobs/{job_id}").json()
            if job["state"] in states:
                return dict(job)
            assert time.monotonic() < stop_at, f"job {job_id} stayed {job['state']}"
            time.sleep(0.05)  # polling interval, bounded by the deadline


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    root = tmp_path_factory.mktemp("hostile")
    outside = root / "outside"
    outside.mkdir()
    sentinel = Sentinel.plant(outside / "sentinel.csv")
    data_dir = root / "data"
    settings = make_settings(data_dir, resource_interval_seconds=60.0)
    with run_server(create_app(settings), settings) as server:
        state = Hostile(server, data_dir, outside, sentinel)
        yield state
        assert server.thread.is_alive()
    # after everything the module did: the sentinel was never written, deleted or sent back
    sentinel.assert_untouched()
    assert not any(sentinel.content in body for body in state.bodies)


def _strict_json(response: httpx.Response) -> Any:
    """The body as strict JSON (NaN or Infinity in it would be a bug of its own)."""

    def refuse(constant: str) -> None:
        raise AssertionError(f"non-standard JSON constant {constant} in {response.text[:200]}")

    return json.loads(response.content, parse_constant=refuse)


def _names_field(response: httpx.Response, field_path: str) -> bool:
    body = _strict_json(response)
    return field_path in json.dumps(body)


CODE_AND_PATHS: list[tuple[str, dict[str, Any], str]] = [
    ("code as model", {"model": {"name": "__import__('os').system('touch pwned')"}}, "model.name"),
    ("import path as model", {"model": {"name": "os:system"}}, "model.name"),
    ("dotted class as model", {"model": {"name": "torch.nn.Transformer"}}, "model.name"),
    ("URL as dataset", {"dataset": {"name": "https://evil.example/d.csv"}}, "dataset.name"),
    (
        "URL as csv file",
        {"dataset": {"name": "csv", "params": {"file": "http://evil.example/x.csv"}}},
        "dataset.params.file",
    ),
    (
        "absolute csv file",
        {"dataset": {"name": "csv", "params": {"file": "/etc/passwd"}}},
        "dataset.params.file",
    ),
    (
        "parent csv file",
        {"dataset": {"name": "csv", "params": {"file": "../outside/sentinel.csv"}}},
        "dataset.params.file",
    ),
    (
        "code in model params",
        {"model": {"name": "mlp", "params": {"activation": "__import__('os').getcwd()"}}},
        "model.params.activation",
    ),
    (
        "class hook in params",
        {"model": {"name": "mlp", "params": {"__class__": "os.system"}}},
        "model.params.__class__",
    ),
    ("optimizer class path", {"optimizer": {"name": "torch.optim.SGD"}}, "optimizer.name"),
    (
        "scheduler class path",
        {"scheduler": {"name": "torch.optim.lr_scheduler.LambdaLR"}},
        "scheduler.name",
    ),
    ("shell in device", {"device": "cuda; rm -rf /"}, "device"),
    ("extra callback field", {"callbacks": ["os.system"]}, "callbacks"),
]

ABSURD_SIZES: list[tuple[str, dict[str, Any], str]] = [
    ("epochs 10**12", {"epochs": 10**12}, "epochs"),
    ("epochs 0", {"epochs": 0}, "epochs"),
    ("batch_size 0", {"batch_size": 0}, "batch_size"),
    ("batch_size 10**9", {"batch_size": 10**9}, "batch_size"),
    (
        "hidden size 10**9",
        {"model": {"name": "mlp", "params": {"hidden_sizes": [10**9]}}},
        "model.params.hidden_sizes.0",
    ),
    (
        "10**4 hidden layers",
        {"model": {"name": "mlp", "params": {"hidden_sizes": [8] * 10**4}}},
        "model.params.hidden_sizes",
    ),
    (
        "cnn channels 10**6",
        {"model": {"name": "cnn", "params": {"channels": [10**6]}}},
        "model.params.channels.0",
    ),
    (
        "synthetic n_samples 10**12",
        {"dataset": {"name": "synthetic_classification", "params": {"n_samples": 10**12}}},
        "dataset.params.n_samples",
    ),
    (
        "synthetic 2e6 x 4096 values",
        {
            "dataset": {
                "name": "synthetic_regression",
                "params": {"n_samples": 2_000_000, "n_features": 4096},
            }
        },
        "dataset.params",
    ),
    (
        "synthetic n_classes 10**9",
        {"dataset": {"name": "synthetic_classification", "params": {"n_classes": 10**9}}},
        "dataset.params.n_classes",
    ),
    ("lr 'NaN' string", {"optimizer": {"lr": "NaN"}}, "optimizer.lr"),
    ("lr 'Infinity' string", {"optimizer": {"lr": "Infinity"}}, "optimizer.lr"),
    ("lr 1e300", {"optimizer": {"lr": 1e300}}, "optimizer.lr"),
    ("negative seed", {"seed": -1}, "seed"),
    ("seed 2**64", {"seed": 2**64}, "seed"),
    ("resource interval 0", {"resources": {"interval_seconds": 0}}, "resources.interval_seconds"),
    ("checkpoint keep_last 10**9", {"checkpoint": {"keep_last": 10**9}}, "checkpoint.keep_last"),
    ("name of 10**5 characters", {"name": "n" * 10**5}, "name"),
]

RAW_NUMBERS: list[tuple[str, bytes, str]] = [
    ("lr NaN", b'{"optimizer": {"lr": NaN}}', "optimizer.lr"),
    ("lr Infinity", b'{"optimizer": {"lr": Infinity}}', "optimizer.lr"),
    ("lr -Infinity", b'{"optimizer": {"lr": -Infinity}}', "optimizer.lr"),
    ("lr 1e400", b'{"optimizer": {"lr": 1e400}}', "optimizer.lr"),
    ("epochs 1e400", b'{"epochs": 1e400}', "epochs"),
    ("min_delta NaN", b'{"early_stop": {"min_delta": NaN}}', "early_stop.min_delta"),
]


def _spec(overrides: dict[str, Any]) -> dict[str, Any]:
    return {**BASE, **overrides}


def _raw_spec(fragment: bytes) -> bytes:
    base = json.dumps(BASE).encode()
    return base[:-1] + b", " + fragment[1:-1] + b"}"


def test_specs_with_code_urls_import_paths_or_absurd_sizes_are_refused(hostile: Hostile) -> None:
    jobs_before = hostile.job_count()
    slowest = 0.0
    refused = 0
    cases = [
        (label, json.dumps(_spec(o)).encode(), f) for label, o, f in CODE_AND_PATHS + ABSURD_SIZES
    ]
    cases += [(label, _raw_spec(fragment), f) for label, fragment, f in RAW_NUMBERS]
    rss_before = psutil.Process().memory_info().rss
    for label, body, field_path in cases:
        started = time.monotonic()
        response = hostile.submit_raw(body)
        slowest = max(slowest, time.monotonic() - started)
        assert response.status_code == 422, (label, response.status_code, response.text[:300])
        assert _names_field(response, field_path), (label, response.text[:500])
        assert len(response.content) < 20_000, (label, len(response.content))
        refused += 1
    rss_growth = psutil.Process().memory_info().rss - rss_before
    assert hostile.job_count() == jobs_before, "a refused spec created a job"
    assert not (hostile.data_dir / "pwned").exists() and not Path("pwned").exists()
    assert hostile.request("GET", "/healthz").status_code == 200
    # the server shares this process: nothing the specs asked for (10**12 epochs, 10**9-wide
    # layers, 10**12 samples) was allocated
    assert rss_growth < 200 * 2**20, rss_growth
    record(
        "6b hostile specs",
        specs=len(cases),
        refused_422_naming_field=refused,
        slowest_seconds=round(slowest, 3),
        rss_growth_mib=round(rss_growth / 2**20, 1),
    )


@pytest.mark.slow  # runs a real job
def test_code_in_a_job_name_is_kept_as_text_and_never_run(hostile: Hostile) -> None:
    marker = hostile.outside / "ran"
    name = f"__import__('os').system('touch {marker}') {{{{7*7}}}} $(touch {marker})"
    response = hostile.request("POST", "/jobs", json={**BASE, "name": name})
    assert response.status_code == 201, response.text
    job = hostile.wait_for_state(response.json()["id"], {"completed", "failed"})
    assert job["state"] == "completed", job
    assert job["name"] == name
    assert not marker.exists()


def test_oversized_and_deeply_nested_bodies_are_refused_without_allocating_them(
    hostile: Hostile,
) -> None:
    process = psutil.Process()
    figures: dict[str, Any] = {}
    big = b'{"name": "' + b"a" * (50 * 2**20) + b'"}'
    started = time.monotonic()
    response = hostile.submit_raw(big)
    figures["declared_50mib_seconds"] = round(time.monotonic() - started, 3)
    assert response.status_code == 413, response.text[:300]
    assert "TRAINBUS_MAX_BODY_BYTES" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "'
        for _ in range(50):
            yield b"a" * 2**20
        yield b'"}'

    del big
    # client and server share this process: the chunked upload holds 1 MiB at a time on the
    # client side, so what RSS gains is the server's
    rss_before = process.memory_info().rss
    started = time.monotonic()
    try:
        chunked = httpx.post(
            hostile.server.url + "/jobs",
            content=chunks(),
            headers={**hostile.server.headers, "content-type": "application/json"},
            timeout=30,
        )
        figures["chunked_status"] = chunked.status_code
        assert chunked.status_code == 413, chunked.text[:300]
    except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError) as error:
        # the server answered 413 and closed the connection while the client still sent
        figures["chunked_status"] = f"closed while sending ({type(error).__name__})"
    figures["chunked_50mib_seconds"] = round(time.monotonic() - started, 3)
    figures["rss_growth_mib"] = round((process.memory_info().rss - rss_before) / 2**20, 1)

    depth = 200_000
    deep = _raw_spec(
        b'{"model": {"name": "mlp", "params": {"x": ' + b"[" * depth + b"]" * depth + b"}}}"
    )
    response = hostile.submit_raw(deep)
    assert response.status_code == 400, response.text[:300]
    assert "JSON" in response.json()["detail"]
    deep_object = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
    response = hostile.submit_raw(deep_object)
    assert response.status_code == 400, response.text[:300]

    assert hostile.request("GET", "/healthz").status_code == 200
    assert hostile.request("GET", "/jobs").status_code == 200
    # 50 MiB were sent; the server held at most a little of it
    assert figures["rss_growth_mib"] < 16, figures
    record("6b oversized bodies", nesting_depth=depth, **figures)


HOSTILE_IDS = [
    "..",
    "%2e%2e",
    "%2e%2e%2f",
    "..%2f..%2f..%2fetc%2fpasswd",
    "%252e%252e%252f",
    "%2fetc%2fpasswd",
    "%00",
    "a%00b",
    "..%5c..%5cwindows",
    "a%5cb",
    "%c0%ae%c0%ae%c0%af",
    "x" * 5000,
]


def _id_routes(job_id: str, checkpoint: str) -> list[tuple[str, str]]:
    return [
        ("GET", "/jobs/{id}"),
        ("DELETE", "/jobs/{id}"),
        ("POST", "/jobs/{id}/pause"),
        ("POST", "/jobs/{id}/resume"),
        ("POST", "/jobs/{id}/stop"),
        ("GET", "/jobs/{id}/events"),
        ("GET", "/jobs/{id}/checkpoints"),
        ("GET", "/jobs/{id}/checkpoints/" + checkpoint),
        ("GET", f"/jobs/{job_id}/checkpoints/{{id}}"),
    ]


def _finished_job(hostile: Hostile, **overrides: Any) -> tuple[str, str]:
    """A real job run to its end; returns its id and its latest checkpoint's name."""
    response = hostile.request("POST", "/jobs", json={**BASE, **overrides})
    assert response.status_code == 201, response.text
    job = hostile.wait_for_state(response.json()["id"], {"completed"})
    listed = hostile.request("GET", f"/jobs/{job['id']}/checkpoints").json()
    assert listed, job
    return str(job["id"]), str(listed[0]["name"])


async def test_ids_and_names_that_leave_their_folder_are_refused_on_every_route(
    hostile: Hostile,
) -> None:
    job_id, checkpoint = _finished_job(hostile)
    statuses: dict[int, int] = {}
    tried = 0
    for hostile_id in HOSTILE_IDS:
        for method, template in _id_routes(job_id, checkpoint):
            path = template.replace("{id}", hostile_id)
            status, body = hostile.raw(method, path)
            tried += 1
            statuses[status] = statuses.get(status, 0) + 1
            assert 400 <= status < 500, (method, path[:80], status, body[:200])
            assert status != 401, path[:80]
            assert "detail" in json.loads(body), body[:200]
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                f"{hostile.server.ws_url}/jobs/{hostile_id}/events/ws",
                additional_headers=hostile.server.headers,
                proxy=None,
            ):
                pass
        tried += 1
        assert 400 <= refused.value.response.status_code < 500
    # refused DELETEs and commands left the real job and its checkpoint as they were
    assert hostile.request("GET", f"/jobs/{job_id}").json()["state"] == "completed"
    assert hostile.request("GET", f"/jobs/{job_id}/checkpoints/{checkpoint}").status_code == 200
    record(
        "6c hostile ids",
        ids=len(HOSTILE_IDS),
        requests=tried,
        statuses={str(code): count for code, count in sorted(statuses.items())},
    )


def _fake_checkpoint(real: Path, target: Path, content: bytes) -> None:
    """A copy of checkpoint folder ``real`` at ``target`` whose state file is ``content``, with a
    manifest that matches it (what an attacker with write access outside would craft)."""
    shutil.copytree(real, target)
    (target / "state.pt").write_bytes(content)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["serial"] = int(manifest["serial"]) + 1000
    manifest["files"]["state.pt"] = {
        **manifest["files"]["state.pt"],
        "size": len(content),
        "sha256": hashlib.sha256(content).hexdigest(),
    }
    (target / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.slow  # runs three real jobs
def test_symlinks_planted_in_the_data_folder_are_not_followed_out_of_it(
    hostile: Hostile,
) -> None:
    sentinel = hostile.sentinel
    figures: dict[str, Any] = {}

    # a dataset file that links out of datasets/
    datasets = hostile.data_dir / "datasets"
    datasets.mkdir(exist_ok=True)
    (datasets / "leak.csv").symlink_to(sentinel.path)
    response = hostile.request(
        "POST", "/jobs", json={**BASE, "dataset": {"name": "csv", "params": {"file": "leak.csv"}}}
    )
    if response.status_code == 201:
        job = hostile.wait_for_state(response.json()["id"], {"failed"})
        assert "outside" in job["error"]["message"], job
        figures["csv_link"] = "job failed: " + job["error"]["message"][:80]
    else:
        assert 400 <= response.status_code < 500, response.text
        figures["csv_link"] = response.status_code

    # a checkpoint folder that links out of the job's folder, beside the real ones
    job_a, real_a = _finished_job(hostile)
    checkpoints_a = hostile.data_dir / "jobs" / job_a / "checkpoints"
    _fake_checkpoint(checkpoints_a / real_a, hostile.outside / "crafted", sentinel.content)
    (checkpoints_a / "crafted").symlink_to(hostile.outside / "crafted")
    listed = hostile.request("GET", f"/jobs/{job_a}/checkpoints")
    assert listed.status_code == 200
    assert "crafted" not in [item["name"] for item in listed.json()]
    download = hostile.request("GET", f"/jobs/{job_a}/checkpoints/crafted")
    assert download.status_code == 404, download.status_code
    assert hostile.request("GET", f"/jobs/{job_a}/checkpoints/{real_a}").status_code == 200

    # a state file inside a real checkpoint that links out
    state = checkpoints_a / real_a / "state.pt"
    manifest_path = checkpoints_a / real_a / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"]["state.pt"].update(size=sentinel.size, sha256=sentinel.digest)
    manifest_path.write_text(json.dumps(manifest))
    state.unlink()
    state.symlink_to(sentinel.path)
    download = hostile.request("GET", f"/jobs/{job_a}/checkpoints/{real_a}")
    assert download.status_code == 404, download.status_code

    # the whole checkpoints folder, and the whole job folder, linking out
    job_b, real_b = _finished_job(hostile)
    job_c, real_c = _finished_job(hostile)
    for job_id, real, link in (
        (job_b, real_b, hostile.data_dir / "jobs" / job_b / "checkpoints"),
        (job_c, real_c, hostile.data_dir / "jobs" / job_c),
    ):
        away = hostile.outside / f"away-{job_id}"
        if link.name == "checkpoints":
            _fake_checkpoint(link / real, away / real, sentinel.content)
        else:
            _fake_checkpoint(
                link / "checkpoints" / real, away / "checkpoints" / real, sentinel.content
            )
        shutil.rmtree(link)
        link.symlink_to(away)
        for path in (f"/jobs/{job_id}/checkpoints", f"/jobs/{job_id}/checkpoints/{real}"):
            response = hostile.request("GET", path)
            assert response.status_code == 409, (path, response.status_code, response.text)
            assert "symbolic link" in response.json()["detail"]
        # deleting the job removes the link, never what it points at
        assert hostile.request("DELETE", f"/jobs/{job_id}").status_code == 204
        assert (
            away / ("" if link.name == "checkpoints" else "checkpoints") / real / "state.pt"
        ).exists()

    sentinel.assert_untouched()
    leaked = [body[:100] for body in hostile.bodies if sentinel.content in body]
    assert leaked == []
    record(
        "6c planted symlinks",
        links=[
            "datasets/leak.csv",
            "checkpoints/crafted",
            "state.pt",
            "checkpoints/",
            "jobs/<id>/",
        ],
        responses_checked=len(hostile.bodies),
        sentinel_bytes=sentinel.size,
        sentinel_in_responses=len(leaked),
        **figures,
    )


def test_unknown_query_parameters_are_refused_naming_the_known_ones(hostile: Hostile) -> None:
    """A misspelt ``after_seq`` must not silently return every event from the start."""
    for path, unknown, known in (
        ("/jobs/_server/events?after=5", "after", "after_seq"),
        ("/jobs?limt=1", "limt", "limit"),
        ("/jobs?state=running&__proto__=x", "__proto__", "state"),
    ):
        response = hostile.request("GET", path)
        assert response.status_code == 422, (path, response.text)
        body = _strict_json(response)
        assert body["detail"][0]["loc"] == ["query", unknown]
        assert known in body["detail"][0]["msg"]


def _body_of_unknown_keys(count: int) -> bytes:
    """A job spec with ``count`` unknown four-character keys (9 bytes each)."""
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    keys = (
        "".join(digits[index // 36**power % 36] for power in range(4)) for index in range(count)
    )
    extra = b",".join(b'"%s":0' % key.encode() for key in keys)
    return json.dumps(BASE).encode()[:-1] + b"," + extra + b"}"


def test_a_body_of_many_unknown_keys_gets_a_small_422_quickly(hostile: Hostile) -> None:
    body = _body_of_unknown_keys(105_000)
    assert 0.9 * 2**20 < len(body) <= 2**20  # under the body limit: the server must read it
    started = time.monotonic()
    response = hostile.submit_raw(body)
    seconds = time.monotonic() - started
    assert response.status_code == 422, response.text[:300]
    assert len(response.content) < 16 * 1024
    assert "105,0" in _strict_json(response)["message"]
    assert seconds < 1.0
    assert hostile.job_count() == hostile.job_count()  # still answering
    record(
        "4 many unknown keys",
        body_bytes=len(body),
        response_bytes=len(response.content),
        seconds=round(seconds, 3),
    )


def test_a_422_lists_a_bounded_number_of_errors_and_counts_the_rest(hostile: Hostile) -> None:
    body = _body_of_unknown_keys(900)  # under the key limit: the validator reports each one
    response = hostile.submit_raw(body)
    assert response.status_code == 422
    answer = _strict_json(response)
    assert len(answer["detail"]) <= 20
    assert answer["errors_not_listed"] == 900 - len(answer["detail"])
    assert "900 errors" in answer["message"]


@pytest.mark.parametrize(
    "fragment",
    [b'{"name": "\\ud800"}', b'{"\\udfff": 1}', b'{"model": {"name": "\\ud800x"}}'],
    ids=["lone surrogate value", "lone surrogate key", "surrogate in a nested name"],
)
def test_lone_surrogates_get_a_422_not_a_500(hostile: Hostile, fragment: bytes) -> None:
    response = hostile.submit_raw(_raw_spec(fragment))
    assert response.status_code == 422, response.text[:300]
    assert response.headers["content-type"].startswith("application/json")
    _strict_json(response)


def test_a_token_sent_in_the_query_string_is_refused_and_never_logged(hostile: Hostile) -> None:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    keeper = Keep()
    access = logging.getLogger("uvicorn.access")
    access.addHandler(keeper)
    token = hostile.server.token
    try:
        refused = httpx.get(f"{hostile.server.url}/jobs?token={token}", timeout=30)
        assert refused.status_code == 401
        named = httpx.get(f"{hostile.server.url}/jobs?api_key=s3cret-value&x={token}", timeout=30)
        assert named.status_code == 401
    finally:
        access.removeHandler(keeper)
    assert any("/jobs?" in line for line in lines), lines
    assert not any(token in line or "s3cret-value" in line for line in lines), lines


def test_error_bodies_name_no_path_of_the_server(hostile: Hostile) -> None:
    """A broken checkpoint is reported by its name and what is wrong, not by where the server
    keeps its files."""
    response = hostile.request("POST", "/jobs", json=BASE)
    assert response.status_code == 201, response.text
    job_id = response.json()["id"]
    assert hostile.wait_for_state(job_id, {"completed", "failed"})["state"] == "completed"
    listed = hostile.request("GET", f"/jobs/{job_id}/checkpoints").json()
    assert listed
    name = listed[0]["name"]
    state_file = hostile.data_dir / "jobs" / job_id / "checkpoints" / name / "state.pt"
    state_file.unlink()
    state_file.mkdir()  # a directory where the file is expected
    try:
        response = hostile.request("GET", f"/jobs/{job_id}/checkpoints/{name}")
    finally:
        state_file.rmdir()
    assert response.status_code in (404, 409), response.text
    detail = _strict_json(response)["detail"]
    assert name in detail
    for folder in {str(hostile.data_dir), str(hostile.data_dir.resolve())}:
        assert folder not in response.text
    assert "/jobs/" not in detail and "/checkpoints/" not in detail
