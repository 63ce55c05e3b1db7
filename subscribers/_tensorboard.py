"""TensorBoard: a job's hyperparameters, metrics, checkpoints and end state as event files."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainbus.bus import EventBus

from ._trackers import RecordKind, TrackerBackend, TrackerRecord, TrackerSubscriber

__all__ = ["TensorBoardExporter"]


class _TensorBoardBackend:
    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self._writer: Any = None

    def _open(self, purge_step: int | None) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # the tensorboard extra

        self.log_dir.mkdir(parents=True, exist_ok=True)
        # purge_step: TensorBoard hides what an earlier run wrote at or past this step
        return SummaryWriter(str(self.log_dir), purge_step=purge_step, flush_secs=10)

    def write(self, records: Sequence[TrackerRecord]) -> None:
        for record in records:
            if record.kind is RecordKind.START:
                if self._writer is None:
                    self._writer = self._open(record.step + 1 if record.step else None)
                    self._hyperparameters(record.values)
                continue
            writer = self._writer
            if writer is None:  # the stream began past train_start (a gap): start plainly
                writer = self._writer = self._open(None)
            if record.kind is RecordKind.METRICS:
                for tag, value in record.values.items():
                    writer.add_scalar(tag, value, record.step)
            elif record.kind is RecordKind.CHECKPOINT:
                writer.add_text("checkpoints", _markdown(record.values), record.step)
            elif record.kind is RecordKind.END:
                writer.add_text("end_state", str(record.values["state"]), record.step)
        if self._writer is not None:
            self._writer.flush()

    def _hyperparameters(self, params: Mapping[str, Any]) -> None:
        from torch.utils.tensorboard.summary import hparams

        plain = {k: v if isinstance(v, int | float | str | bool) else json.dumps(v) for k, v in
                 params.items()}  # fmt: skip
        self._writer.add_text("hparams", _markdown(plain), 0)
        if plain:
            experiment, start, end = hparams(plain, {})  # type: ignore[no-untyped-call]
            file_writer = self._writer._get_file_writer()
            for summary in (experiment, start, end):
                file_writer.add_summary(summary)

    def close(self) -> None:
        if self._writer is not None:
            with contextlib.suppress(Exception):  # the job is over; nobody to tell
                self._writer.close()
            self._writer = None


def _markdown(values: Mapping[str, Any]) -> str:
    rows = "\n".join(f"| {key} | {value} |" for key, value in values.items())
    return f"| key | value |\n|---|---|\n{rows}"


class TensorBoardExporter(TrackerSubscriber):
    """Writes a job's run as TensorBoard event files under ``log_dir``.

    Scalars: each epoch metric at its step, ``train_loss_step`` and ``lr`` every
    ``log_every_n_steps``; text: ``hparams`` (also in the HParams tab), ``checkpoints``,
    ``end_state``. A resumed job writes into the same folder with ``purge_step`` set past its
    checkpoint's step, so TensorBoard shows the replayed steps once.

    :param log_dir: the run's folder (``<job folder>/tensorboard`` by default in the server).
    Other parameters: :class:`TrackerSubscriber`.
    """

    tracker = "tensorboard"

    def __init__(self, *, job_id: str, bus: EventBus | None, log_dir: Path, **options: Any) -> None:
        super().__init__(job_id=job_id, bus=bus, **options)
        self.log_dir = Path(log_dir)

    def make_backend(self) -> TrackerBackend:
        return _TensorBoardBackend(self.log_dir)
