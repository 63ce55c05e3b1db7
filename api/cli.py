"""The ``trainbus`` command: run the service, submit and steer jobs, watch them live.

::

    trainbus serve [--host H] [--port P] [--data-dir D]
    trainbus demo                      # serve on ./data and submit a digits job to watch
    trainbus submit SPEC.yaml [--watch]
    trainbus jobs [--state S] | status JOB | watch JOB | events JOB
    trainbus pause JOB | resume JOB | stop JOB | delete JOB
    trainbus checkpoints JOB | download JOB [NAME|latest|best] | predict JOB FILE.csv
    trainbus models | datasets

Client commands find the server with ``--url`` and the token with ``--token`` (both also
accepted after the command) or ``TRAINBUS_TOKEN``; else in the server's data folder
(``--data-dir`` or ``TRAINBUS_DATA_DIR``; without either, the default data folder, then
``./data``), where a running server records its URL (``server.json``) beside its token
(``token``); else ``http://<TRAINBUS_HOST>:<TRAINBUS_PORT>``.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._local import ServerLocation, find_server
from ._settings import Settings
from ._watch import ProgressView, format_metrics
from .client import ClientError, HTTPStatusError, StreamClosed, TrainbusClient

__all__ = ["DEMO_SPEC", "build_parser", "main"]

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trainbus", description="Run, watch and steer PyTorch training jobs."
    )
    _connection_options(parser, top_level=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--host", help="address to bind (default 127.0.0.1)")
        sub.add_argument("--port", type=int, help="port (default 8000)")
        sub.add_argument("--max-running-jobs", type=int, help="jobs training at once")
        sub.add_argument("--log-level", help="uvicorn log level")
        _connection_options(sub, server=True)

    server_options(commands.add_parser("serve", help="run the service"))
    demo = commands.add_parser("demo", help="run the service on ./data with a demo job")
    server_options(demo)
    submit = _client_command(
        commands, "submit", help="submit a job spec (YAML or JSON file, - for stdin)"
    )
    submit.add_argument("spec", help="path of the spec file")
    submit.add_argument("--watch", action="store_true", help="then watch it live")
    jobs = _client_command(commands, "jobs", help="list jobs")
    jobs.add_argument("--state", help="only jobs in this state")
    jobs.add_argument("--limit", type=int, default=50)
    jobs.add_argument("--offset", type=int, default=0)
    jobs.add_argument("--json", action="store_true", help="print JSON")
    for name, text in [
        ("status", "show a job"),
        ("watch", "follow a job live (progress bars)"),
        ("pause", "pause a running job (it keeps its running slot while paused)"),
        ("resume", "resume a paused, stopped or interrupted job"),
        ("stop", "stop a job"),
        ("save", "checkpoint a running or paused job at its next batch"),
        ("delete", "delete an ended job, its events and its checkpoints"),
        ("checkpoints", "list a job's checkpoints (marking the latest and the best)"),
    ]:
        sub = _client_command(commands, name, help=text)
        sub.add_argument("job", help="job id")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print JSON")
    set_lr = _client_command(
        commands, "set-lr", help="set a running or paused job's learning rate at its next batch"
    )
    set_lr.add_argument("job", help="job id")
    set_lr.add_argument("value", type=float, help="the new learning rate")
    events = _client_command(
        commands, "events", help="print a job's stored events as JSON lines"
    )
    events.add_argument("job", help="job id")
    events.add_argument("--after-seq", type=int, default=0, help="only events after this seq")
    events.add_argument("--types", help="comma-separated event types")
    events.add_argument(
        "--limit", type=int, help="print at most this many (default: all, fetched page by page)"
    )
    download = _client_command(commands, "download", help="download a checkpoint's state file")
    download.add_argument("job", help="job id")
    download.add_argument(
        "name", nargs="?", default="latest", help="checkpoint name, latest or best (default latest)"
    )
    download.add_argument(
        "-o", "--output", type=Path, help="file to write (default: JOB-NAME.pt here)"
    )
    predict = _client_command(
        commands, "predict", help="predict a CSV file's rows with a job's checkpoint"
    )
    predict.add_argument("job", help="job id")
    predict.add_argument("csv", type=Path, help="CSV file with a header row")
    predict.add_argument(
        "--checkpoint", default="best", help="checkpoint name, latest or best (default best)"
    )
    _client_command(commands, "models", help="list the models a spec may name")
    _client_command(commands, "datasets", help="list the datasets a spec may name")
    return parser


def _connection_options(
    parser: argparse.ArgumentParser, *, top_level: bool = False, server: bool = False
) -> None:
    """``--url``, ``--token`` and ``--data-dir``, before the command or after it."""
    # after the command, an option left out must not undo one given before it
    default = None if top_level else argparse.SUPPRESS
    if not server:
        parser.add_argument(
            "--url",
            default=default,
            help="server URL (default: the one recorded in the data folder, else "
            "http://HOST:PORT from the settings)",
        )
    parser.add_argument(
        "--token",
        default=default,
        help="API token (default: TRAINBUS_TOKEN, else the data folder's token file)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=default,
        help="the server's data folder (SQLite, checkpoints, its URL and token; default: "
        "TRAINBUS_DATA_DIR)",
    )


def _client_command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, *, help: str
) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help)
    _connection_options(sub)
    return sub


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


def _locate(settings: Settings, args: argparse.Namespace) -> ServerLocation:
    host = settings.host if settings.host not in ("0.0.0.0", "::") else "127.0.0.1"
    if args.data_dir is not None:
        folders = [args.data_dir]
    elif "data_dir" in settings.model_fields_set:  # TRAINBUS_DATA_DIR
        folders = [settings.data_dir]
    else:  # the demo's ./data (where the user stands), then the default folder
        folders = list(dict.fromkeys([Path("data"), settings.data_dir]))
    return find_server(
        url=args.url,
        token=args.token,
        token_from_env=None if settings.token is None else settings.token.get_secret_value(),
        data_dirs=folders,
        default_url=f"http://{host}:{settings.port}",
    )


class UsageError(Exception):
    """A mistake on the command line or in a local file: printed as one line, exit status 2."""


def _load_spec(path: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as error:
        raise UsageError(f"cannot read the spec file {path}: {error.strerror or error}") from None
    try:
        spec = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = "" if mark is None else f" (line {mark.line + 1}, column {mark.column + 1})"
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UsageError(f"{path} is not valid YAML{where}: {problem}") from None
    if not isinstance(spec, dict):
        raise UsageError(f"{path} does not hold a job spec (a mapping of fields)")
    return spec


def describe_error(error: ClientError) -> str:
    """The server's error as lines to read: one per field for a 422."""
    detail = error.detail
    if isinstance(detail, list):
        lines = [f"{error.status}: the request is invalid:"]
        for item in detail:
            if isinstance(item, dict):
                field = ".".join(str(part) for part in item.get("loc", ()) if part != "body")
                lines.append(f"  {field or 'body'}: {item.get('msg', item)}")
            else:
                lines.append(f"  {item}")
        return "\n".join(lines)
    return f"{error.status}: {detail}"


def readable_time(value: Any) -> str:
    """A Unix time as a local date and time (``2026-12-07 04:21:57``)."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return str(value)
    return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")


def plain_console() -> Console:
    """A console that prints every string as it is: text from the server or the user is never
    read as rich markup (``[link=...]``, ``[/x]``) or emoji codes."""
    return Console(markup=False, emoji=False, highlight=False, soft_wrap=True)


def _print_job(console: Console, record: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    for key in (
        "id",
        "name",
        "state",
        "epoch",
        "step",
        "stop_reason",
        "error",
        "waiting_for",
        "checkpoint",
        "created_at",
        "started_at",
        "ended_at",
    ):
        value = record.get(key)
        if value is None:
            continue
        if key.endswith("_at"):
            value = readable_time(value)
        elif key == "error" and isinstance(value, dict):
            value = f"{value.get('type', 'error')}: {value.get('message', '')}"
        table.add_row(Text(key), Text(str(value)))
    if record.get("metrics"):
        table.add_row(Text("metrics"), Text(format_metrics(record["metrics"], limit=8)))
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
    from ._auth import ensure_token
    from ._local import bound_url, write_server_url
    from ._server import bind_then_write_token, uvicorn_config

    settings, generated = ensure_token(settings)
    assert settings.token is not None
    token = settings.token.get_secret_value()
    config = uvicorn_config(create_app(settings), settings)
    server = uvicorn.Server(config)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``trainbus`` command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    console = plain_console()
    try:
        settings = Settings()  # the environment is read here, once
    except ValidationError as error:
        console.print(f"trainbus: invalid TRAINBUS_* setting:\n{error}", style="red")
        return 2
    try:
        return _run(args, settings, console)
    except StreamClosed as error:
        console.print(f"trainbus: stream closed: {error.detail}", style="red")
        return 1
    except ClientError as error:
        console.print(f"trainbus: {describe_error(error)}", style="red")
        return 1
    except httpx.TransportError as error:
        console.print(f"trainbus: cannot reach the server: {error}", style="red")
        return 1
    except (UsageError, ValueError) as error:
        console.print(f"trainbus: {error}", style="red")
        return 2
    except KeyboardInterrupt:  # Ctrl+C in watch: the job goes on
        return 130


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
    location = _locate(settings, args)
    try:
        with TrainbusClient(location.url, location.token) as client:
            return _client_command_run(command, args, client, console)
    except ClientError as error:
        if error.status == 401:
            raise HTTPStatusError(401, f"{error.detail}\n{location.explain()}") from None
        raise
    except httpx.TransportError as error:
        raise httpx.TransportError(f"{error} ({location.explain()})") from None


def _client_command_run(
    command: str, args: argparse.Namespace, client: TrainbusClient, console: Console
) -> int:
    if command == "submit":
        record = client.submit(_load_spec(args.spec))
        console.print(f"submitted {record['id']} ({record['state']})")
        return _watch(client, record["id"], console) if args.watch else 0
    if command == "jobs":
        page = client.jobs(args.state, offset=args.offset, limit=args.limit)
        if args.json:
            print(json.dumps(page, indent=2))
            return 0
        table = Table("id", "state", "epoch", "step", "metrics")
        for job in page["items"]:
            table.add_row(
                Text(str(job["id"])),
                Text(str(job["state"])),
                Text(str(job.get("epoch") or "")),
                Text(str(job.get("step") or "")),
                Text(format_metrics(job.get("metrics") or {})),
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
    if command in ("pause", "resume", "stop", "save", "set-lr"):
        if command == "set-lr":
            accepted = client.set_lr(args.job, args.value)
        else:
            accepted = getattr(client, command)(args.job)
        console.print(f"{command} requested for {args.job} (command {accepted['command_id']})")
        return 0
    if command == "events":
        for event in _all_events(client, args.job, args.after_seq, args.types, args.limit):
            print(json.dumps(event))
        return 0
    if command == "delete":
        client.delete(args.job)
        console.print(f"deleted {args.job}")
        return 0
    if command == "checkpoints":
        _print_checkpoints(console, client.checkpoints(args.job))
        return 0
    if command == "download":
        target = args.output or Path(f"{args.job}-{args.name}.pt")
        client.download_checkpoint(args.job, args.name, target)
        console.print(f"saved {args.job} checkpoint {args.name} to {target}")
        return 0
    if command == "predict":
        return _predict(client, args, console)
    if command in ("models", "datasets"):
        _print_registry(console, client.registry()[command])
        return 0
    raise ValueError(f"unknown command {command!r}")


EVENTS_PAGE = 1000


def _all_events(
    client: TrainbusClient, job_id: str, after_seq: int, types: str | None, limit: int | None
) -> Iterator[dict[str, Any]]:
    """The job's stored events, page by page, up to ``limit``; says on stderr how to get the
    rest when the limit cut them short."""
    printed = 0
    while limit is None or printed < limit:
        size = EVENTS_PAGE if limit is None else min(EVENTS_PAGE, limit - printed)
        page = client.events(job_id, after_seq=after_seq, types=types, limit=size)
        yield from page
        printed += len(page)
        if len(page) < size:
            return
        after_seq = page[-1]["seq"]
    if client.events(job_id, after_seq=after_seq, types=types, limit=1):
        print(
            f"trainbus: stopped at --limit {limit}; more events follow: "
            f"--after-seq {after_seq}",
            file=sys.stderr,
        )


def _print_checkpoints(console: Console, checkpoints: list[dict[str, Any]]) -> None:
    table = Table("name", "epoch", "step", "reason", "metrics", "saved", "")
    for info in checkpoints:
        marks = [mark for mark in ("latest", "best") if info.get(mark)]
        table.add_row(
            Text(str(info["name"])),
            Text(_one_based(info.get("epoch"))),
            Text(str(info.get("step", ""))),
            Text(str(info.get("reason", ""))),
            Text(format_metrics(info.get("metrics") or {})),
            Text(readable_time(info.get("created_at", ""))),
            Text(", ".join(marks)),
        )
    console.print(table)
    console.print(f"{len(checkpoints)} checkpoints")


def _one_based(epoch: Any) -> str:
    """Epochs as users count them (the first is 1), as in checkpoint names and ``watch``."""
    return str(epoch + 1) if isinstance(epoch, int) and not isinstance(epoch, bool) else ""


def _print_registry(console: Console, entries: Any) -> None:
    table = Table("name", "description")
    for entry in entries if isinstance(entries, list) else []:
        table.add_row(Text(str(entry.get("name", ""))), Text(str(entry.get("description", ""))))
    console.print(table)


def _predict(client: TrainbusClient, args: argparse.Namespace, console: Console) -> int:
    """Download the job's checkpoint, rebuild the model with its preprocessing and print one
    prediction per row of the CSV file."""
    from trainbus.worker import load_model

    header, rows = _read_csv(args.csv)
    with tempfile.TemporaryDirectory(prefix="trainbus-") as folder:
        state = Path(folder) / "state.pt"
        try:
            client.download_checkpoint(args.job, args.checkpoint, state)
        except ClientError as error:
            if error.status != 404 or args.checkpoint != "best":
                raise
            client.download_checkpoint(args.job, "latest", state)  # no monitored metric
        model = load_model(state)
    if model.feature_names and set(model.feature_names) <= set(header):
        columns = [header.index(name) for name in model.feature_names]
    elif len(header) == model.num_features:
        columns = list(range(len(header)))
    else:
        raise UsageError(
            f"{args.csv} has {len(header)} columns; the model takes {model.num_features} "
            "features" + (f" ({', '.join(model.feature_names)})" if model.feature_names else "")
        )
    try:
        features = [[float(row[i]) for i in columns] for row in rows]
    except (ValueError, IndexError) as error:
        raise UsageError(f"{args.csv}: every feature must be a number ({error})") from None
    for prediction in model.predict(features):
        print(prediction)
    return 0


def _read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    try:
        with path.open(newline="") as handle:
            rows = list(csv.reader(handle))
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    if len(rows) < 2:
        raise UsageError(f"{path} needs a header row and at least one row of features")
    return rows[0], [row for row in rows[1:] if row]


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
