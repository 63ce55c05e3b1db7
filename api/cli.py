"""The ``trainbus`` command: run the service, submit and steer jobs, watch them live.

::

    trainbus serve [--host H] [--port P] [--data-dir D]
    trainbus demo                      # serve on ./data and submit a digits job to watch
    trainbus submit SPEC.yaml [--watch]
    trainbus jobs [--state S] | status JOB | watch JOB | events JOB
    trainbus pause JOB | resume JOB | stop JOB | delete JOB
    trainbus checkpoints JOB | download JOB [NAME|latest|best] | predict JOB FILE.csv
    trainbus models | datasets
    trainbus agent JOB [--node-rank N] [--once]  # this host's ranks of a job on several hosts

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
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml
from pydantic import SecretStr, ValidationError
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._cli_output import (
    describe_error,
    plain_console,
    print_checkpoints,
    print_job,
    print_registry,
)
from ._demo import DEMO_SPEC, run_demo
from ._local import ServerLocation, find_server
from ._node_agent import AgentRefused, follow_job
from ._settings import Settings
from ._watch import ProgressView, format_metrics
from .client import ClientError, HTTPStatusError, StreamClosed, TrainbusClient

__all__ = ["DEMO_SPEC", "build_parser", "main"]


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
    events = _client_command(commands, "events", help="print a job's stored events as JSON lines")
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
    agent = _client_command(
        commands,
        "agent",
        help="run this host's ranks of a distributed job on several hosts (nnodes > 1)",
    )
    agent.add_argument("job", help="job id")
    agent.add_argument(
        "--node-rank",
        type=int,
        default=1,
        help="this host's number among the job's hosts, 1 to nnodes - 1 (the server's is 0)",
    )
    agent.add_argument(
        "--wait",
        type=float,
        default=600.0,
        help="seconds to wait for a run of the job to join (default 600)",
    )
    agent.add_argument(
        "--once",
        action="store_true",
        help="join one run, then exit (default: join each run until the job completes)",
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


def _watch(client: TrainbusClient, job_id: str, console: Console) -> int:
    record = client.job(job_id)
    epochs = record.get("spec", {}).get("epochs")
    with ProgressView(
        job_id, epochs=epochs if isinstance(epochs, int) else None, console=console
    ) as view:
        state = view.follow(client.stream(job_id, after_seq=0))
    return 0 if state in ("completed", "stopped") else 1


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
    except (UsageError, AgentRefused, ValueError) as error:
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
        return run_demo(_server_settings(settings, args), console)
    location = _locate(settings, args)
    try:
        with TrainbusClient(location.url, location.token) as client:
            if command == "agent":  # its files go to this host's data folder
                return follow_job(
                    client,
                    args.job,
                    node_rank=args.node_rank,
                    wait=args.wait,
                    once=args.once,
                    data_dir=Path(args.data_dir or settings.data_dir),
                    console=console,
                )
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
            print_job(console, record)
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
        print_checkpoints(console, client.checkpoints(args.job))
        return 0
    if command == "download":
        target = args.output or Path(f"{args.job}-{args.name}.pt")
        client.download_checkpoint(args.job, args.name, target)
        console.print(f"saved {args.job} checkpoint {args.name} to {target}")
        return 0
    if command == "predict":
        return _predict(client, args, console)
    if command in ("models", "datasets"):
        print_registry(console, client.registry()[command])
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
            f"trainbus: stopped at --limit {limit}; more events follow: --after-seq {after_seq}",
            file=sys.stderr,
        )


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
