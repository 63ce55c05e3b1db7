"""``trainbus demo``: the service on a local data folder with a job to watch, and the commands
it prints to watch, pause, resume and stop that job."""

from __future__ import annotations

import shlex
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console

from ._settings import Settings
from .client import ClientError, TrainbusClient

__all__ = ["DEMO_SPEC", "demo_instructions", "run_demo"]


DEMO_SPEC: dict[str, Any] = {
    "name": "demo-digits",
    "model": {"name": "mlp", "params": {"hidden_sizes": [2048, 2048]}},
    "dataset": {"name": "digits"},
    "epochs": 45,
    "batch_size": 16,
    "seed": 0,
    "checkpoint": {"every_n_epochs": 5},
}
"""About a minute of training on a quiet 2-core machine (about 1.3 s an epoch): long enough to
watch, pause and resume; a checkpoint every 5 epochs keeps the disk quiet."""


def run_demo(settings: Settings, console: Console) -> int:
    from ._app import create_app
    from ._auth import ensure_token
    from ._local import bound_url, write_server_url
    from ._server import TrainbusServer, bind_then_write_token, uvicorn_config

    settings, generated = ensure_token(settings)
    assert settings.token is not None
    token = settings.token.get_secret_value()
    config = uvicorn_config(create_app(settings), settings)
    server = TrainbusServer(config)
    # a second demo on a busy port stops here, before it touches the token file
    sock = bind_then_write_token(config, settings, generated=generated)
    url = bound_url(sock)
    write_server_url(settings.data_dir, url)

    def submit_when_ready() -> None:
        client = TrainbusClient(url, token)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not server.should_exit:
            try:
                if client.ready().get("status") == "ready":
                    break
            except (httpx.TransportError, ClientError):
                pass
            time.sleep(0.2)  # polling the server that starts in this process
        try:
            job = client.submit(DEMO_SPEC)
        except (httpx.TransportError, ClientError) as error:
            console.print(f"trainbus demo: could not submit the demo job: {error}", style="red")
            return
        console.print(demo_instructions(url, settings.data_dir, job["id"]), soft_wrap=True)

    threading.Thread(target=submit_when_ready, daemon=True).start()
    server.run(sockets=[sock])
    return 0


def demo_instructions(url: str, data_dir: Path, job_id: str) -> str:
    """What ``trainbus demo`` prints once its job is queued: commands to copy, as they are."""
    invoked = Path(sys.argv[0])
    program = shlex.quote(str(invoked)) if invoked.name == "trainbus" else "trainbus"
    if data_dir.resolve() != Path("data").resolve():  # the CLI looks in ./data by itself
        program += f" --data-dir {shlex.quote(str(data_dir))}"
    return (
        f"\ntrainbus is running on {url} (data in {data_dir})\n"
        f"demo job: {job_id} (about a minute of training)\n\n"
        f"Open the dashboard: {url}/#/jobs/{job_id}\n"
        f"  (sign in with the token in {data_dir / 'token'})\n\n"
        "In another terminal, from this folder:\n"
        f"  watch it live:   {program} watch {job_id}\n"
        f"  pause it:        {program} pause {job_id}\n"
        f"  resume it:       {program} resume {job_id}\n"
        f"  stop it:         {program} stop {job_id}\n"
        f"  its checkpoints: {program} checkpoints {job_id}\n\n"
        f"API docs in a browser: {url}/docs (Authorize with the token in "
        f"{data_dir / 'token'})\n"
        "Press Ctrl+C to stop the server (running jobs are checkpointed and can be resumed).\n"
    )
