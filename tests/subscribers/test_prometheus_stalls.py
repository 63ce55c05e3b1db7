"""The exporter's stall series: ``trainbus_job_stalled`` is 1 from a ``job_stalled`` event
until the job's step moves on, it pauses or it ends; ``trainbus_job_stalls_total`` counts
the reports."""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from trainbus.bus import Event, EventType
from trainbus.subscribers import PrometheusExporter


class _Job:
    def __init__(self, exporter: PrometheusExporter, job_id: str = "a") -> None:
        self.exporter, self.job_id, self.seq = exporter, job_id, 0

    def see(self, kind: EventType, **data: Any) -> None:
        self.seq += 1
        self.exporter.observe([Event(self.job_id, self.seq, kind, 100.0 + self.seq, data)])

    def stall_series(self) -> tuple[float, float]:
        text = self.exporter.render().decode()
        values = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("job_id") == self.job_id
            and sample.name in ("trainbus_job_stalled", "trainbus_job_stalls_total")
        }
        return values["trainbus_job_stalled"], values["trainbus_job_stalls_total"]


def test_a_stall_lasts_until_the_step_moves_and_each_report_counts() -> None:
    job = _Job(PrometheusExporter(process_metrics=False))
    job.see(EventType.JOB_STARTED)
    job.see(EventType.TRAIN_BATCH_END, epoch=0, step=3)
    assert job.stall_series() == (0.0, 0.0)
    job.see(EventType.JOB_STALLED, epoch=0, step=3, stalled_for_seconds=60.0, action="warn")
    assert job.stall_series() == (1.0, 1.0)
    job.see(EventType.MODEL_SAVE, epoch=0, step=3, reason="command")  # no progress
    assert job.stall_series() == (1.0, 1.0)
    job.see(EventType.TRAIN_BATCH_END, epoch=0, step=4)
    assert job.stall_series() == (0.0, 1.0)
    job.see(EventType.JOB_STALLED, epoch=0, step=4, stalled_for_seconds=60.0, action="warn")
    job.see(EventType.FIT_EPOCH_END, epoch=0, step=5, metrics={})  # a step on: progress
    assert job.stall_series() == (0.0, 2.0)


def test_a_stalled_job_that_pauses_or_ends_is_no_longer_stalled() -> None:
    exporter = PrometheusExporter(process_metrics=False)
    paused, failed = _Job(exporter, "paused"), _Job(exporter, "failed")
    for job in (paused, failed):
        job.see(EventType.JOB_STARTED)
        job.see(EventType.JOB_STALLED, epoch=0, step=0, stalled_for_seconds=5.0, action="fail")
        assert job.stall_series() == (1.0, 1.0)
    paused.see(EventType.JOB_PAUSED, step=0)
    failed.see(EventType.JOB_FAILED, error={"type": "Stalled", "message": "stalled"})
    assert paused.stall_series() == (0.0, 1.0)
    assert failed.stall_series() == (0.0, 1.0)
