"""Live progress of a job in the terminal (``trainbus watch``): rich progress bars fed by the
job's event stream."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

__all__ = ["ProgressView", "format_metrics"]

_END = {"job_completed", "job_stopped", "job_failed"}


def format_metrics(metrics: Mapping[str, Any], limit: int = 4) -> str:
    """``val_loss=0.312 val_accuracy=0.91`` for the first few numeric metrics."""
    parts = []
    for name, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            parts.append(f"{name}={value:.4g}")
        if len(parts) >= limit:
            break
    return " ".join(parts)


def _describe(kind: str, data: Mapping[str, Any]) -> str:
    """``job_paused (by api: user request)`` or ``lr_changed to 0.001 (by lr_plateau)``."""
    text = kind
    if kind == "lr_changed" and isinstance(data.get("value"), int | float):
        text += f" to {data['value']:.4g}"
    source, reason = data.get("source"), data.get("reason")
    why = ": ".join(str(part) for part in (source, reason) if part)
    if why:
        text += f" ({why})"
    return text


def _first_int(data: Mapping[str, Any], *names: str) -> int | None:
    for name in names:
        value = data.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class ProgressView:
    """Two bars (epochs and batches of the current epoch) with loss, validation metrics and
    ETA, plus one line per notable event (pause, resume, stop, early stop, LR change, end);
    checkpoints are listed by ``trainbus checkpoints``, not here."""

    def __init__(self, job_id: str, *, epochs: int | None = None, console: Console | None = None):
        self.job_id = job_id
        self.console = console or Console()
        self.progress = Progress(
            TextColumn("{task.description}", style="bold", markup=False),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}", markup=False),
            console=self.console,
            transient=False,
        )
        self.epochs: TaskID = self.progress.add_task("epochs", total=epochs, info="")
        self.batches: TaskID = self.progress.add_task("batches", total=None, info="")
        self.state = "unknown"
        self.last_seq = 0
        self.val = ""
        self.batches_per_epoch: int | None = None

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def note(self, text: str, style: str = "") -> None:
        """Print a line above the bars; ``text`` (event data) is never read as markup."""
        self.progress.console.print(Text(text, style=style))

    def handle(self, event: Mapping[str, Any]) -> bool:
        """Show one event; True once the job's run has ended."""
        kind = str(event.get("type"))
        data: Mapping[str, Any] = event.get("data") or {}
        if kind != "gap":
            self.last_seq = int(event.get("seq", self.last_seq))
        progress = self.progress
        if kind in ("train_start", "pretrain_routine_start"):
            epochs = _first_int(data, "epochs", "total_epochs")
            if epochs:
                progress.update(self.epochs, total=epochs)
            self.batches_per_epoch = _first_int(data, "batches_per_epoch") or self.batches_per_epoch
        elif kind == "train_epoch_start":
            epoch = _first_int(data, "epoch") or 0
            batches = (
                _first_int(data, "batches_per_epoch", "batches", "num_batches")
                or self.batches_per_epoch
            )
            progress.update(self.epochs, completed=epoch)
            progress.reset(self.batches, total=batches)
            progress.update(self.batches, description=f"epoch {epoch + 1}")
        elif kind == "train_batch_end":
            batch = _first_int(data, "batch", "batch_index")
            metrics = data.get("metrics") if isinstance(data.get("metrics"), Mapping) else data
            loss = metrics.get("loss", metrics.get("train_loss")) if metrics else None
            info = f"loss={loss:.4g}" if isinstance(loss, int | float) else ""
            if batch is not None:
                progress.update(self.batches, completed=batch + 1, info=info)
            else:
                progress.advance(self.batches)
                progress.update(self.batches, info=info)
        elif kind == "fit_epoch_end":
            end_epoch = _first_int(data, "epoch")
            metrics = data.get("metrics")
            if isinstance(metrics, Mapping):
                self.val = format_metrics(
                    {k: v for k, v in metrics.items() if str(k).startswith("val")} or metrics
                )
            if end_epoch is not None:
                progress.update(self.epochs, completed=end_epoch + 1, info=self.val)
        elif kind in (
            "job_paused",
            "job_resumed",
            "job_stopping",
            "early_stop",
            "lr_changed",
            "job_interrupted",
        ):
            self.note(_describe(kind, data), "yellow")
        elif kind == "gap":
            self.note(f"missed events {data.get('from_seq')}..{data.get('to_seq')}", "red")
        elif kind == "job_started":
            self.note(f"job {self.job_id} started", "green")
        if kind in _END:
            self.state = kind.removeprefix("job_")
            if kind == "job_completed":
                total = progress.tasks[0].total
                if total:
                    progress.update(self.epochs, completed=total)
            detail = data.get("error") or data.get("reason") or ""
            self.note(f"job {self.job_id} {self.state} {detail}".rstrip(), "bold")
            return True
        return False

    def follow(self, events: Iterable[Mapping[str, Any]]) -> str:
        """Show events until the job ends; returns its final state."""
        for event in events:
            if self.handle(event):
                break
        return self.state
