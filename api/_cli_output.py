"""What the ``trainbus`` command prints: job records, checkpoints, the registry and the
server's errors, always as plain text (nothing from the server or the user is read as markup)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ._watch import format_metrics
from .client import ClientError

__all__ = [
    "describe_error",
    "plain_console",
    "print_checkpoints",
    "print_job",
    "print_registry",
    "readable_time",
]


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


def print_job(console: Console, record: dict[str, Any]) -> None:
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
        "devices",
        "rendezvous",
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
        elif key == "rendezvous" and isinstance(value, dict):  # where other hosts join
            value = f"{value.get('endpoint')} (run {value.get('run')})"
        elif isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        table.add_row(Text(key), Text(str(value)))
    if record.get("metrics"):
        table.add_row(Text("metrics"), Text(format_metrics(record["metrics"], limit=8)))
    console.print(table)


def print_checkpoints(console: Console, checkpoints: list[dict[str, Any]]) -> None:
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


def print_registry(console: Console, entries: Any) -> None:
    table = Table("name", "description")
    for entry in entries if isinstance(entries, list) else []:
        table.add_row(Text(str(entry.get("name", ""))), Text(str(entry.get("description", ""))))
    console.print(table)
