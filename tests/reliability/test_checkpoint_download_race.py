"""Downloading checkpoints of a running job while its retention deletes them.

With ``keep_last: 1`` and a checkpoint every step, a checkpoint is deleted moments after the
next one is written, so a client that lists the checkpoints and downloads one is often too
late. That must be answered with a 404 whose message says what happened (or a whole file),
never a 500 or a cut-off body.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from trainbus.api import TrainbusClient, create_app

from ..api.server import make_settings, run_server
from .conftest import record

pytestmark = pytest.mark.slow

SPEC: dict[str, Any] = {
    "name": "downloads-racing-retention",
    "model": {"name": "mlp", "params": {"hidden_sizes": [512]}},  # ~0.5 MB checkpoints
    "dataset": {"name": "digits"},
    "epochs": 6,
    "batch_size": 16,
    "seed": 5,
    "device": "cpu",
    "torch_threads": 1,
    "checkpoint": {"keep_last": 1, "keep_best": 0, "every_n_steps": 1},
}


def test_a_checkpoint_deleted_by_retention_mid_download_is_a_404_never_a_500(
    tmp_path: Path,
) -> None:
    settings = make_settings(tmp_path / "data")
    outcomes: Counter[int] = Counter()
    with (
        run_server(create_app(settings), settings) as server,
        TrainbusClient(server.url, server.token) as client,
        httpx.Client(base_url=server.url, headers=server.headers, timeout=30) as http,
    ):
        job_id = client.submit(SPEC)["id"]
        downloaded = 0
        while True:
            done = client.job(job_id)["state"] not in ("queued", "running")
            for checkpoint in client.checkpoints(job_id):
                response = http.get(f"/jobs/{job_id}/checkpoints/{checkpoint['name']}")
                outcomes[response.status_code] += 1
                if response.status_code == 200:
                    assert len(response.content) == checkpoint["bytes"], checkpoint
                    if downloaded % 20 == 0:  # a sample: the body is a whole checkpoint
                        state = torch.load(io.BytesIO(response.content), weights_only=True)
                        assert state["model"], checkpoint
                    downloaded += 1
                else:
                    assert response.status_code == 404, response.text
                    # the message says what to do: list the checkpoints again
                    assert f"GET /jobs/{job_id}/checkpoints" in response.json()["detail"]
            if done:
                break
        assert client.job(job_id)["state"] == "completed"
    record("checkpoint_download_race", outcomes=dict(outcomes))
    assert outcomes[200] > 0, outcomes
    assert outcomes[404] > 0, f"no download raced retention: {outcomes}"
