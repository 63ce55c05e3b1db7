"""The programs group of the registry, through real entry points of a distribution on
``sys.path``, and the program job spec."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainbus.worker import (
    JobSpec,
    ProgramEntry,
    ProgramSpec,
    Registry,
    SpecError,
    is_program_spec,
    parse_job_spec,
)


def _distribution(site: Path, entries: str) -> None:
    info = site / "trainbus_programs_under_test-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: trainbus-programs-under-test\nVersion: 0.1\n"
    )
    (info / "entry_points.txt").write_text(f"[trainbus.programs]\n{entries}")


def test_programs_come_from_entry_points_and_a_bad_one_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _distribution(
        tmp_path,
        "fail = tests.api.programs:FAIL\n"
        "params_only = tests.api.programs:FloodParams\n"
        "missing = tests.api.no_such_module:PROGRAM\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = Registry()
    with caplog.at_level(logging.ERROR):
        registry.load_plugins()
    assert isinstance(registry.program("fail"), ProgramEntry)
    assert set(registry.programs) == {"fail"}
    assert "params_only in trainbus.programs is not a registry entry" in caplog.text
    assert "missing in trainbus.programs failed to load" in caplog.text
    described = registry.describe()["programs"]
    assert [p["name"] for p in described] == ["fail"]
    assert described[0]["description"] == "Raises in its first epoch."
    with pytest.raises(SpecError, match="unknown program 'nope'; available programs: fail"):
        registry.program("nope")


def test_a_spec_with_program_is_a_program_spec_and_the_rest_is_unchanged() -> None:
    built_in = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 1}
    assert isinstance(parse_job_spec(built_in), JobSpec)
    assert not is_program_spec(built_in)
    with pytest.raises(ValidationError) as refused:
        parse_job_spec({"program": {"name": "anything"}, "stall_timeout_seconds": 0})
    errors = {tuple(e["loc"]): e["msg"] for e in refused.value.errors()}
    # none is registered in this process: the message says where programs come from
    assert "available programs: none" in errors[("program", "name")]
    assert "trainbus.programs entry point group" in errors[("program", "name")]
    assert ("stall_timeout_seconds",) in errors
    with pytest.raises(ValidationError, match="program"):
        ProgramSpec.model_validate({"name": "no program named"})
