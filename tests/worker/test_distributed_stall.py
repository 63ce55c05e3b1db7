"""A rank of a distributed job that hangs: the job fails naming that rank, whether the stall
detector or the process group's timeout sees it first, and no process of the job is left.

Through a `trainbus serve` with the faulty models plugin: the ``hanging`` model hangs in its
forward pass on rank 1 only, so rank 0 waits for it in the next gradient all-reduce."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.served import Served, serve
from tests.worker._faulty_models import install

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals, prctl")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    site = install(tmp_path_factory.mktemp("site"))
    with serve(
        tmp_path_factory.mktemp("served"),
        site,
        devices="cpu:2",
        distributed_rendezvous="127.0.0.1:0",
        stop_grace_seconds="1",
        resource_interval_seconds="60",
    ) as server:
        yield server


def _hanging_on_rank_1(**extra: Any) -> dict[str, Any]:
    distributed = {"nproc_per_node": 2, "backend": "gloo", **extra.pop("distributed", {})}
    model = {"name": "hanging", "params": {"after_steps": 5, "hang_seconds": 300, "only_rank": 1}}
    return {"model": model, "dataset": {"name": "iris"}, "epochs": 50, "batch_size": 16,
            "torch_threads": 2, "device": "cpu", "distributed": distributed, **extra}  # fmt: skip


def _failed(served: Served, spec: dict[str, Any], within: float) -> dict[str, Any]:
    before = {process.pid for process in served.descendants()}
    with served.client() as client:
        job_id = client.submit(spec)["id"]
        started = time.monotonic()
        record = client.wait(job_id, timeout=within + 30, interval=0.05)
    assert record["state"] == "failed", record
    assert time.monotonic() - started < within
    deadline = time.monotonic() + 10
    while {process.pid for process in served.descendants()} - before:
        assert time.monotonic() < deadline, "a process of the job is left"
        time.sleep(0.05)  # polling interval, bounded by the deadline
    return record


def test_the_stall_detector_fails_the_job_naming_the_rank_that_hung(served: Served) -> None:
    spec = _hanging_on_rank_1(stall_timeout_seconds=2.0, on_stall="fail")
    record = _failed(served, spec, within=30)
    message = record["error"]["message"]
    assert "the job stalled and was ended" in message, message
    assert "rank 1 (pid" in message and "stalled at step" in message, message
    assert "rank 0 waited for it in a collective" in message, message
    with served.client() as client:
        stalled = client.events(record["id"], types="job_stalled")
    assert stalled and "rank 1" in stalled[0]["data"]["ranks"], stalled


def test_the_process_group_timeout_fails_the_job_naming_the_rank_that_hung(
    served: Served,
) -> None:
    spec = _hanging_on_rank_1(distributed={"collective_timeout_seconds": 5})
    record = _failed(served, spec, within=45)
    message = record["error"]["message"]
    assert record["error"]["type"] == "RankFailed", record["error"]
    # rank 0's collective timed out, so the agent saw it fail first; the hung rank is named
    assert message.startswith("rank 0 of 2"), message
    assert "rank 1 (pid" in message and "stalled at step" in message, message
    assert "rank 0 waited for it in a collective" in message, message
