"""The durable checkpoint layout: manifest, hashes, safe loading, fallback, retention."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from trainbus.subscribers import (
    CheckpointCorrupt,
    CheckpointNotFound,
    UnsafeCheckpoint,
    adopt_newest_checkpoint,
    checkpoint_path,
    clean_orphans,
    latest_valid_state,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from trainbus.subscribers._checkpoint_files import apply_retention, write_checkpoint, write_pointer

from ..reliability.conftest import unfinished_checkpoint_entries


def _state(value: float) -> dict[str, Any]:
    return {"weights": torch.full((4,), value), "epoch": int(value), "nested": [1, (2, "x")]}


def _save(job_dir: Path, value: float, *, pointed: bool = True, **kwargs: Any) -> str:
    """Write a checkpoint; ``pointed`` False: as a process killed before it moved ``latest``
    leaves it (renamed into place, unnamed)."""
    info = write_checkpoint(
        job_dir,
        _state(value),
        epoch=int(value),
        step=int(value) * 10,
        reason="epoch_end",
        metrics={"val_loss": kwargs.pop("val_loss", value)},
        monitor="val_loss",
        **kwargs,
    )
    if pointed:
        write_pointer(job_dir, "latest", info)
    return info.name


def test_manifest_describes_the_files(tmp_path: Path) -> None:
    name = _save(tmp_path, 3.0)
    folder = tmp_path / "checkpoints" / name
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json", "state.pt"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["state.pt"]["size"] == (folder / "state.pt").stat().st_size
    assert manifest["epoch"] == 3 and manifest["step"] == 30
    assert manifest["monitor_value"] == 3.0
    assert manifest["torch_version"] == torch.__version__
    assert manifest["format_version"] == 1
    info = verify_checkpoint(tmp_path, name)
    assert info.name == name and info.bytes == manifest["files"]["state.pt"]["size"]
    assert info.to_dict()["metrics"] == {"val_loss": 3.0}


def test_round_trip_and_aliases(tmp_path: Path) -> None:
    _save(tmp_path, 1.0)
    second = _save(tmp_path, 2.0)
    state = load_checkpoint(tmp_path)
    assert torch.equal(state["weights"], torch.full((4,), 2.0))
    assert state["nested"] == [1, (2, "x")]
    assert checkpoint_path(tmp_path, "latest").name == second
    assert checkpoint_path(tmp_path, "last").name == second
    with pytest.raises(CheckpointNotFound):
        checkpoint_path(tmp_path, "best")
    with pytest.raises(CheckpointNotFound):
        load_checkpoint(tmp_path, "../etc")


def test_names_are_unique(tmp_path: Path) -> None:
    assert _save(tmp_path, 1.0) != _save(tmp_path, 1.0)
    assert len(list_checkpoints(tmp_path)) == 2


def test_corrupt_newest_falls_back_to_newest_valid(tmp_path: Path) -> None:
    _save(tmp_path, 1.0)
    good = _save(tmp_path, 2.0)
    bad = _save(tmp_path, 3.0)
    state_file = tmp_path / "checkpoints" / bad / "state.pt"
    data = bytearray(state_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt):
        load_checkpoint(tmp_path, bad)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    assert verify_checkpoint(tmp_path, good).epoch == 2


def test_recovery_points_latest_at_a_complete_checkpoint_a_crash_left_unnamed(
    tmp_path: Path,
) -> None:
    assert adopt_newest_checkpoint(tmp_path) is None  # no checkpoints: nothing to name
    first = _save(tmp_path, 1.0)
    pointer = tmp_path / "checkpoints" / "latest.json"
    written = pointer.stat().st_mtime_ns
    assert adopt_newest_checkpoint(tmp_path) == first
    assert pointer.stat().st_mtime_ns == written  # they agreed: nothing was written
    missed = _save(tmp_path, 2.0, pointed=False)
    corrupt = _save(tmp_path, 3.0, pointed=False)
    state_file = tmp_path / "checkpoints" / corrupt / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-8])
    assert checkpoint_path(tmp_path, "latest").name == first
    assert adopt_newest_checkpoint(tmp_path) == missed  # the newest that verifies
    assert checkpoint_path(tmp_path, "latest").name == missed
    assert load_checkpoint(tmp_path)["epoch"] == 2


def test_recovery_names_a_first_checkpoint_whose_pointer_was_never_written(
    tmp_path: Path,
) -> None:
    only = _save(tmp_path, 1.0, pointed=False)
    with pytest.raises(CheckpointNotFound):
        checkpoint_path(tmp_path, "latest")
    assert adopt_newest_checkpoint(tmp_path) == only
    assert checkpoint_path(tmp_path, "latest").name == only


def test_truncated_and_missing_files(tmp_path: Path) -> None:
    first = _save(tmp_path, 1.0)
    second = _save(tmp_path, 2.0)
    (tmp_path / "checkpoints" / second / "state.pt").write_bytes(b"")
    (tmp_path / "checkpoints" / first / "state.pt").unlink()
    with pytest.raises(CheckpointNotFound):
        load_checkpoint(tmp_path)
    assert latest_valid_state("job", tmp_path) is None
    assert latest_valid_state("job", tmp_path / "nowhere") is None


class _Payload:
    """Unpickling this object would create the sentinel file."""

    def __init__(self, sentinel: Path) -> None:
        self.sentinel = sentinel

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    _save(tmp_path, 1.0)
    sentinel = tmp_path / "pwned"
    # A checkpoint with a correct manifest, so that only the pickle is wrong.
    info = write_checkpoint(
        tmp_path, {"evil": _Payload(sentinel)}, epoch=5, step=50, reason="command"
    )
    write_pointer(tmp_path, "latest", info)
    with pytest.raises(UnsafeCheckpoint):
        load_checkpoint(tmp_path, info.name)
    assert load_checkpoint(tmp_path)["epoch"] == 1  # falls back, never unsafe
    assert not sentinel.exists()


def test_retention_keeps_newest_and_best(tmp_path: Path) -> None:
    names = [_save(tmp_path, 1.0, val_loss=v) for v in (0.5, 0.1, 0.9, 0.3, 0.8)]
    deleted = apply_retention(tmp_path, keep_last=2, keep_best=1, mode="min")
    kept = {info.name for info in list_checkpoints(tmp_path)}
    assert kept == {names[1], names[3], names[4]}
    assert set(deleted) == {names[0], names[2]}
    apply_retention(tmp_path, keep_last=1, keep_best=0, mode="max")
    assert {info.name for info in list_checkpoints(tmp_path)} == {names[4]}


def test_clean_orphans(tmp_path: Path) -> None:
    _save(tmp_path, 1.0)
    folder = tmp_path / "checkpoints"
    (folder / ".tmp-epoch-0002-abcd").mkdir()
    (folder / ".tmp-epoch-0002-abcd" / "state.pt").write_bytes(b"partial")
    (folder / ".tmp-latest-1234.json").write_text("{")
    assert sorted(clean_orphans(tmp_path)) == [".tmp-epoch-0002-abcd", ".tmp-latest-1234.json"]
    assert unfinished_checkpoint_entries(tmp_path) == []
    assert load_checkpoint(tmp_path)["epoch"] == 1
    # what a write in place cut short would leave: the leftover check names it
    (folder / "epoch-0003-step-00000003").mkdir()
    (folder / "epoch-0003-step-00000003" / "state.pt").write_bytes(b"partial")
    unfinished = unfinished_checkpoint_entries(tmp_path)
    assert [entry.split()[0] for entry in unfinished] == ["epoch-0003-step-00000003"]


def test_checkpoints_are_never_read_through_symbolic_links(tmp_path: Path) -> None:
    """A link planted in a job's folder (to a valid checkpoint elsewhere) is never followed:
    not as a checkpoint folder, not as its state file, not as the whole checkpoints folder."""
    outside = tmp_path / "outside"
    planted = _save(outside, 9.0)
    job = tmp_path / "job"
    own = _save(job, 1.0)
    # a checkpoint folder that is a link, made the newest and pointed at by `latest`
    (job / "checkpoints" / "linked").symlink_to(outside / "checkpoints" / planted)
    (job / "checkpoints" / "latest.json").write_text(json.dumps({"name": "linked"}))
    assert [info.name for info in list_checkpoints(job)] == [own]
    with pytest.raises(CheckpointNotFound):
        checkpoint_path(job, "linked")
    state = latest_valid_state("job", job)  # what a resume loads
    assert state is not None and torch.equal(state["weights"], torch.full((4,), 1.0))

    # a real checkpoint folder whose state file is a link to another checkpoint's state
    state_file = job / "checkpoints" / own / "state.pt"
    state_file.unlink()
    state_file.symlink_to(outside / "checkpoints" / planted / "state.pt")
    with pytest.raises(CheckpointCorrupt, match="symbolic link"):
        verify_checkpoint(job, own)
    assert latest_valid_state("job", job) is None

    # the whole checkpoints folder a link
    linked_job = tmp_path / "linked-job"
    linked_job.mkdir()
    (linked_job / "checkpoints").symlink_to(outside / "checkpoints")
    assert list_checkpoints(linked_job) == []
    assert latest_valid_state("linked-job", linked_job) is None
