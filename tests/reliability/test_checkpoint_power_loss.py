"""Power loss during checkpoint writes: every cut, with what was not fsynced dropped.

A SIGKILL cannot test durability (the page cache outlives a killed process), so this test
follows CrashMonkey and ALICE: the real checkpoint writer saves a few checkpoints while the
``os`` and ``shutil`` that ``trainbus.subscribers._checkpoint_files`` calls are replaced by a
recorder (every call still reaches the real ones). Then, for every point of the recorded trace, the
states a power cut there can leave on disk are rebuilt in a fresh folder, under this model:

- a file holds what it held at its last ``fsync`` (data written since is lost, a file never
  fsynced is empty);
- a directory entry change (create, mkdir, rename, replace, unlink, removal of a tree) lasts
  for certain only once its directory is fsynced; the others reach the disk in the order they
  were made, so any prefix of them may have reached it (the cut may fall anywhere in the
  journal).

In every such state, after the start-up clean-up: no folder under a final name lacks its
manifest or fails to verify, the newest checkpoint whose write had returned (or a newer one)
loads and verifies, and a ``latest`` or ``best`` pointer that had been moved names a
checkpoint at least that new, which verifies.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import trainbus.subscribers._checkpoint_files as checkpoint_files
import trainbus.subscribers._checkpoint_writer as checkpoint_writer
from trainbus.subscribers import (
    CheckpointInfo,
    CheckpointWriter,
    clean_orphans,
    list_checkpoints,
    load_checkpoint,
    verify_checkpoint,
)
from trainbus.subscribers._checkpoint_layout import read_pointer

from ..subscribers.toy import ToyTrainer
from .conftest import record

_METADATA = frozenset({"create", "mkdir", "rename", "unlink", "rmtree"})


@dataclass(frozen=True, slots=True)
class Op:
    """One recorded call: ``kind``, the path(s) it names (relative to the root), a file id."""

    kind: str
    path: str
    target: str = ""
    file: int = -1
    data: bytes = b""
    marker: tuple[str, str, int] | None = None  # ("checkpoint"|"latest"|"best", name, serial)


def _parent(path: str) -> str:
    return os.path.dirname(path)


@dataclass
class Recorder:
    """Stands in for ``os`` (and ``shutil``) in the checkpoint files: records, then calls."""

    root: Path
    ops: list[Op] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _open: dict[int, tuple[str, int]] = field(default_factory=dict)  # fd -> (path, file id)
    _files: int = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def _relative(self, path: Any) -> str:
        relative = str(Path(path).resolve().relative_to(self.root))
        return "" if relative == "." else relative

    def _add(self, op: Op) -> None:
        with self.lock:
            self.ops.append(op)

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        existed = os.path.lexists(path)
        fd = os.open(path, flags, mode)
        relative = self._relative(path)
        with self.lock:
            self._files += 1
            file = -1 if os.path.isdir(path) else self._files  # -1: a folder
            self._open[fd] = (relative, file)
        if flags & os.O_CREAT and not existed:
            self._add(Op("create", relative, file=file))
        return fd

    def write(self, fd: int, data: Any) -> int:
        written = os.write(fd, data)
        path, file = self._open[fd]
        self._add(Op("write", path, file=file, data=bytes(memoryview(data)[:written])))
        return written

    def fsync(self, fd: int) -> None:
        os.fsync(fd)
        path, file = self._open[fd]
        self._add(Op("fsync", path, file=file))

    def close(self, fd: int) -> None:
        os.close(fd)
        with self.lock:
            del self._open[fd]

    def mkdir(self, path: Any, mode: int = 0o777) -> None:
        os.mkdir(path, mode)
        self._add(Op("mkdir", self._relative(path)))

    def makedirs(self, path: Any, mode: int = 0o777, exist_ok: bool = False) -> None:
        missing = []
        for folder in [Path(path), *Path(path).parents]:
            if folder.exists():
                break
            missing.append(folder)
        os.makedirs(path, mode, exist_ok)
        for folder in reversed(missing):
            self._add(Op("mkdir", self._relative(folder)))

    def rename(self, source: Any, target: Any) -> None:
        os.rename(source, target)
        self._add(Op("rename", self._relative(source), self._relative(target)))

    def replace(self, source: Any, target: Any) -> None:
        os.replace(source, target)
        self._add(Op("rename", self._relative(source), self._relative(target)))

    def unlink(self, path: Any) -> None:
        os.unlink(path)
        self._add(Op("unlink", self._relative(path)))

    def rmtree(self, path: Any, ignore_errors: bool = False) -> None:
        relative = self._relative(path)
        shutil.rmtree(path, ignore_errors=ignore_errors)
        self._add(Op("rmtree", relative))

    def marked(self, function: Callable[..., Any], kind: str | None) -> Callable[..., Any]:
        """``function`` that, once it returns, marks the trace with what it made durable."""

        def call(*args: Any, **kwargs: Any) -> Any:
            result = function(*args, **kwargs)
            which = kind or args[1]
            info: CheckpointInfo = result if kind else args[2]
            self._add(Op("marker", "", marker=(which, info.name, info.serial)))
            return result

        return call


def _persisted_sets(ops: list[Op], cut: int) -> Iterator[frozenset[int]]:
    """The sets of directory changes among ``ops[:cut]`` that a power cut there can leave."""
    metadata = [i for i in range(cut) if ops[i].kind in _METADATA]
    forced = set()
    synced_dirs: dict[str, int] = {}  # directory -> index of its last fsync before the cut
    for i in range(cut):
        if ops[i].kind == "fsync" and ops[i].file < 0:
            synced_dirs[ops[i].path] = i
    for i in metadata:
        op = ops[i]
        folders = {_parent(op.path)} | ({_parent(op.target)} if op.target else set())
        if any(synced_dirs.get(folder, -1) > i for folder in folders):
            forced.add(i)
    seen = set()
    for k in range(len(metadata) + 1):
        persisted = frozenset(forced | set(metadata[:k]))
        if persisted not in seen:
            seen.add(persisted)
            yield persisted


def _build(ops: list[Op], cut: int, persisted: frozenset[int], target: Path) -> None:
    """Write into ``target`` the disk that ``persisted`` directory changes and the fsynced
    data of ``ops[:cut]`` leave."""
    durable: dict[int, bytes] = {}
    written: dict[int, bytearray] = {}
    for op in ops[:cut]:
        if op.kind == "write":
            written.setdefault(op.file, bytearray()).extend(op.data)
        elif op.kind == "fsync" and op.file >= 0:
            durable[op.file] = bytes(written.get(op.file, b""))
    tree: dict[str, int | None] = {"": None, "jobs": None}  # path -> file id (None: a folder)

    def subtree(path: str) -> list[str]:
        return [p for p in tree if p == path or p.startswith(path + "/")]

    for i in sorted(persisted):
        op = ops[i]
        if op.kind in ("create", "mkdir") and _parent(op.path) in tree:
            tree[op.path] = op.file if op.kind == "create" else None
        elif op.kind == "rename" and op.path in tree and _parent(op.target) in tree:
            for old in subtree(op.target):
                del tree[old]
            for old in subtree(op.path):
                tree[op.target + old[len(op.path) :]] = tree.pop(old)
        elif op.kind in ("unlink", "rmtree"):
            for old in subtree(op.path):
                del tree[old]
    for path in sorted(tree):
        file = tree[path]
        if file is None:
            (target / path).mkdir(exist_ok=True)
        else:
            (target / path).write_bytes(durable.get(file, b""))


def _check(job_dir: Path, expected: dict[str, tuple[str, int]]) -> str | None:
    """What is wrong with the checkpoints in ``job_dir`` after a power cut (None: nothing)."""
    clean_orphans(job_dir)  # what start-up does
    folder = job_dir / "checkpoints"
    if folder.is_dir():
        for path in sorted(folder.iterdir()):
            if path.is_dir():  # only the start-up clean-up's leftovers are not final names
                try:
                    verify_checkpoint(job_dir, path.name)
                except Exception as error:
                    return f"folder {path.name!r} under a final name: {error!r}"
    if "checkpoint" in expected:
        name, serial = expected["checkpoint"]
        infos = list_checkpoints(job_dir)  # each verified above
        if not infos or infos[0].serial < serial:
            return f"checkpoint {name!r} was written, but the newest on disk is {infos[:1]}"
        try:
            load_checkpoint(job_dir)  # what a resume loads
        except Exception as error:
            return f"no checkpoint loads although {name!r} was written: {error!r}"
    for which in ("latest", "best"):
        if which in expected:
            name, serial = expected[which]
            pointed = read_pointer(job_dir, which)  # type: ignore[arg-type]
            if pointed is None:
                return f"the {which} pointer, moved to {name!r}, is gone or unreadable"
            try:
                info = verify_checkpoint(job_dir, which)
            except Exception as error:
                return f"the {which} pointer names {pointed!r}, which fails: {error!r}"
            if info.serial < serial:
                return f"the {which} pointer went back from {name!r} to {pointed!r}"
    return None


def _record_checkpoint_writes(job_dir: Path, monkeypatch: pytest.MonkeyPatch) -> list[Op]:
    """The trace of a writer saving three checkpoints (keep one, plus the best one)."""
    recorder = Recorder(job_dir.parent.parent.resolve())
    monkeypatch.setattr(checkpoint_files, "os", recorder)
    monkeypatch.setattr(checkpoint_files, "shutil", recorder)
    write_checkpoint = recorder.marked(checkpoint_files.write_checkpoint, "checkpoint")
    write_pointer = recorder.marked(checkpoint_files.write_pointer, None)
    monkeypatch.setattr(checkpoint_writer, "write_checkpoint", write_checkpoint)
    monkeypatch.setattr(checkpoint_writer, "write_pointer", write_pointer)
    writer = CheckpointWriter(
        job_id=job_dir.name, job_dir=job_dir, bus=None, keep_last=1, keep_best=1
    )
    trainer = ToyTrainer(job_dir.name)
    writer.bind(trainer)
    try:
        for epoch, val_loss in enumerate((1.0, 0.5, 0.7)):
            trainer.train_step()
            trainer.epoch = epoch
            trainer.metrics = {"val_loss": val_loss}
            trainer.save("epoch_end")
            assert writer.flush(timeout=60)
    finally:
        writer.close(timeout=60)
    return recorder.ops


def test_a_power_cut_at_any_point_of_a_checkpoint_write_leaves_a_loadable_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "recorded" / "jobs").mkdir(parents=True)
    ops = _record_checkpoint_writes(tmp_path / "recorded" / "jobs" / "job", monkeypatch)
    monkeypatch.undo()
    kinds = {op.kind for op in ops}
    assert {"create", "write", "fsync", "rename", "mkdir", "rmtree", "marker"} <= kinds, kinds
    written = [op.marker for op in ops if op.marker and op.marker[0] == "checkpoint"]
    assert len(written) == 3, written
    states = failures = 0
    problems: list[str] = []
    for cut in range(len(ops) + 1):
        expected = {op.marker[0]: (op.marker[1], op.marker[2]) for op in ops[:cut] if op.marker}
        for persisted in _persisted_sets(ops, cut):
            states += 1
            disk = tmp_path / f"cut-{states}"
            disk.mkdir()
            _build(ops, cut, persisted, disk)
            problem = _check(disk / "jobs" / "job", expected)
            if problem is not None:
                failures += 1
                if len(problems) < 5:
                    last = ops[cut - 1] if cut else None
                    problems.append(f"cut after op {cut} ({last}): {problem}")
            shutil.rmtree(disk)
    record("checkpoint_power_loss", operations=len(ops), crash_states=states, failures=failures)
    assert not problems, f"{failures} of {states} crash states are unsound:\n" + "\n".join(problems)
