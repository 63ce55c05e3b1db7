"""The ``trainbus`` command: run the service, submit and steer jobs, watch them live.

::

    trainbus serve [--host H] [--port P] [--data-dir D]
    trainbus demo                      # serve on ./data and submit a small digits job
    trainbus submit SPEC.yaml [--watch]
    trainbus jobs [--state S] | status JOB | watch JOB | events JOB
    trainbus pause JOB | resume JOB | stop JOB

Client commands find the server with ``--url`` (default ``http://<TRAINBUS_HOST>:<TRAINBUS_PORT>``)
and the token with ``--token``, ``TRAINBUS_TOKEN`` or, for a server that generated its token,
the ``token`` file it wrote in its data folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.table import Table

from ._auth import read_token_file
from ._settings import Settings
from ._watch import ProgressView, format_metrics
from .client import StreamClosed, TrainbusClient, TrainbusError

__all__ = ["DEMO_SPEC", "build_parser", "main"]

DEMO_SPEC: dict[str, Any] = {
    "name": "demo-digits",
    "model": {"name": "mlp", "params": {"hidden_sizes": [64]}},
    "dataset": {"name": "digits"},
    "epochs": 20,
    "batch_size": 32,
    "seed": 0,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainbus", description="Run, watch and steer PyTorch training jobs."
    )
    parser.add_argument("--url", help="server URL (default: http://HOST:PORT from settings)")
    parser.add_argument("--token", help="API token (default: TRAINBUS_TOKEN or the token file)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", help="address to bind (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="port (default 8000)")
        sub.add_argument("--data-dir", type=Path, help="data folder (SQLite + checkpoints)")
        sub.add_argument("--max-running-jobs", type=int, help="jobs training at once")
        sub.add_argument("--log-level", help="uvicorn log level")

    server_options(commands.add_parser("serve", help="run the service"))
    demo = commands.add_parser("demo", help="run the service on ./data with a demo job")
    server_options(demo)
    submit = commands.add_parser(
        "submit", help="submit a job spec (YAML or JSON file, - for stdin)"
    )
    submit.add_argument("spec", help="path of the spec file")
    submit.add_argument("--watch", action="store_true", help="then watch it live")
    jobs = commands.add_parser("jobs", help="list jobs")
    jobs.add_argument("--state", help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--json", action="store_true", help="print JSON")
    for name, text in [
        ("status", "show a job"),
        ("watch", "follow a job live (progress bars)"),
        ("pause", "pause a running job"),
        ("resume", "resume a paused, stopped or interrupted job"),
        ("stop", "stop a job"),
    ]:
        sub = commands.add_parser(name, help=text)
        sub.add_argument("job", help="job id")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
    events = commands.add_parser("events", help="print a job's stored events as JSON lines")
    events.add_argument("job", help="job id")
    events.add_argument("--after-seq", type=int, default=0)
    events.add_argument("--types", help="comma-separated event types")
    events.add_argument("--limit", type=int, default=1000)
    return parser


def _server_settings(base: Settings, args: argparse.Namespace) -> Settings:
    update = {
        key: value
        for key, value in {
            "host": args.host,
            "port": args.port,
            "data_dir": args.data_dir,
            "max_running_jobs": args.max_running_jobs,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    if getattr(args, "token", None):
        update["token"] = SecretStr(args.token)
    return Settings.model_validate({**base.model_dump(), **update})


def _client(settings: Settings, args: argparse.Namespace) -> TrainbusClient:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    url = args.url or f"http://{host}:{settings.port}"
    token = args.token or (
        settings.token.get_secret_value() if settings.token is not None else None
    )
    if token is None:
        token = read_token_file(settings.data_dir) or read_token_file(Path("data"))
    return TrainbusClient(url, token)


def _load_spec(path: str) -> dict[str, Any]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    spec = yaml.safe_load(text)  # YAML is a superset of JSON
    if not isinstance(spec, dict):
        raise SystemExit(f"trainbus: {path} does not hold a job spec (a mapping)")
    return spec


def _print_job(console: Console, record: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in ("id", "state", "epoch", "step", "stop_reason", "error", "created_at"):
        if record.get(key) is not None:
            table.add_row(key, str(record[key]))
    if record.get("metrics"):
        table.add_row("metrics", format_metrics(record["metrics"], limit=8))
    console.print(table)


def _watch(client: TrainbusClient, job_id: str, console: Console) -> int:
    record = client.job(job_id)
    epochs = record.get("spec", {}).get("epochs")
    with ProgressView(
        job_id, epochs=epochs if isinstance(epochs, int) else None, console=console
    ) as view:
        state = view.follow(client.stream(job_id, after_seq=0))
    return 0 if state in ("completed", "stopped") else 1


def _demo(settings: Settings, console: Console) -> int:
    import uvicorn

    from ._app import create_app
    from ._auth import ensure_token, write_token_file
    from ._server import listening_socket, uvicorn_config

    settings, generated = ensure_token(settings)
    assert settings.token is not None
    token = settings.token.get_secret_value()
    if generated:  # local CLI commands find it there (readable by this user only)
        write_token_file(settings.data_dir, settings.token)
    config = uvicorn_config(create_app(settings), settings)
    server = uvicorn.Server(config)
    url = f"http://{settings.host}:{settings.port}"

    def submit_when_ready() -> None:
        client = TrainbusClient(url, token)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not server.should_exit:
            try:
                if client.ready().get("status") == "ready":
                    break
            except (httpx.TransportError, TrainbusError):
                pass
            time.sleep(0.2)
        try:
            job = client.submit(DEMO_SPEC)
        except (httpx.TransportError, TrainbusError) as error:
            console.print(f"[red]trainbus demo: could not submit the demo job: {error}[/]")
            return
        where = "" if settings.port == 8000 else f"--url {url} "
        console.print(
            f"\n[bold green]trainbus is running on {url}[/] (data in {settings.data_dir})\n"
            f"API token: [bold]{token}[/]\n"
            f"demo job:  [bold]{job['id']}[/]\n\n"
            f"Watch it in another terminal (from this folder, the CLI finds the token in "
            f"{settings.data_dir}/token):\n"
            f"  .venv/bin/trainbus {where}watch {job['id']}\n"
            f"or from anywhere:\n"
            f"  TRAINBUS_TOKEN={token} trainbus {where}watch {job['id']}\n"
            f"API docs: {url}/docs (send the token as a Bearer header)\n"
            f"Press Ctrl+C to stop (running jobs are checkpointed and can be resumed).\n",
            soft_wrap=True,
        )

    threading.Thread(target=submit_when_ready, daemon=True).start()
    server.run(sockets=[listening_socket(config, settings)])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainbus`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        settings = Settings()  # the environment is read here, once
    except ValidationError as error:
        console.print(f"[red]trainbus: invalid TRAINBUS_* setting:[/]\n{error}")
        return 2
    try:
        return _run(args, settings, console)
    except TrainbusError as error:
        console.print(f"[red]trainbus: {error.status}: {error.detail}[/]")
        return 1
    except StreamClosed as error:
        console.print(f"[red]trainbus: stream closed: {error.detail}[/]")
        return 1
    except httpx.TransportError as error:
        console.print(f"[red]trainbus: cannot reach the server: {error}[/]")
        return 1
    except ValueError as error:
        console.print(f"[red]trainbus: {error}[/]")
        return 2


def _run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    command = args.command
    if command == "serve":
        from ._server import serve

        serve(_server_settings(settings, args))
        return 0
    if command == "demo":
        if args.data_dir is None:
            args.data_dir = Path("data")
        return _demo(_server_settings(settings, args), console)
    with _client(settings, args) as client:
        if command == "submit":
            record = client.submit(_load_spec(args.spec))
            console.print(f"submitted [bold]{record['id']}[/] ({record['state']})")
            return _watch(client, record["id"], console) if args.watch else 0
        if command == "jobs":
            page = client.jobs(args.state, offset=args.offset, limit=args.limit)
            if args.json:
                print(json.dumps(page, indent=2))
                return 0
            table = Table("id", "state", "epoch", "step", "metrics")
            for job in page["items"]:
                table.add_row(
                    job["id"],
                    job["state"],
                    str(job.get("epoch") or ""),
                    str(job.get("step") or ""),
                    format_metrics(job.get("metrics") or {}),
                )
            console.print(table)
            console.print(f"{len(page['items'])} of {page['total']} jobs")
            return 0
        if command == "status":
            record = client.job(args.job)
            if args.json:
                print(json.dumps(record, indent=2))
            else:
                _print_job(console, record)
            return 0
        if command == "watch":
            return _watch(client, args.job, console)
        if command in ("pause", "resume", "stop"):
            accepted = getattr(client, command)(args.job)
            console.print(f"{command} requested for {args.job} (command {accepted['command_id']})")
            return 0
        if command == "events":
            for event in client.events(
                args.job, after_seq=args.after_seq, types=args.types, limit=args.limit
            ):
                print(json.dumps(event))
            return 0
    raise ValueError(f"unknown command {command!r}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
