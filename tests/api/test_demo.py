"""A new user follows the README's demo steps literally: ``trainbus demo`` in an empty folder,
then, from that folder, the commands the README (and the demo itself) show."""

from __future__ import annotations

import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import free_port
from trainbus.api import TrainbusClient
from trainbus.api._local import read_server_url, read_token_file

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TRAINBUS = Path(sys.executable).with_name("trainbus")


def readme_demo_steps() -> list[str]:
    """The commands between the README's demo-steps markers, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- demo-steps -->", 1)[1].split("<!-- /demo-steps -->", 1)[0]
    commands = []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("```"):
            commands.append(line)
    return commands


def _lines(stream: IO[str]) -> tuple[queue.Queue[str], threading.Thread]:
    """The lines a process prints, read on a thread (so a wait can have a timeout) that
    closes the pipe at its end."""
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        with stream:
            for line in stream:
                lines.put(line)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    return lines, thread


def _wait_for_line(lines: queue.Queue[str], pattern: str, timeout: float = 90.0) -> re.Match[str]:
    seen = []
    while True:
        try:
            line = lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line matching {pattern!r}; got: {''.join(seen)}") from None
        seen.append(line)
        match = re.search(pattern, line)
        if match:
            return match


@pytest.fixture
def user_env(tmp_path: Path) -> dict[str, str]:
    """A fresh user's environment: no TRAINBUS_* variables, an empty home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRAINBUS_")}
    env.update(HOME=str(tmp_path / "home"), XDG_DATA_HOME=str(tmp_path / "home" / "share"))
    env["COLUMNS"] = "200"
    return env


@pytest.fixture
def demo(tmp_path: Path, user_env: dict[str, str]) -> Iterator[tuple[str, queue.Queue[str]]]:
    port = free_port()
    process = subprocess.Popen(
        [str(TRAINBUS), "demo", "--port", str(port)],
        cwd=tmp_path,
        env=user_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert process.stdout is not None
    lines, reader = _lines(process.stdout)
    try:
        job_id = _wait_for_line(lines, r"demo job: (\S+)").group(1)
        yield job_id, lines
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        reader.join(timeout=10)


def test_the_readme_demo_steps_work_as_written(
    tmp_path: Path, user_env: dict[str, str], demo: tuple[str, queue.Queue[str]]
) -> None:
    job_id, demo_lines = demo
    steps = readme_demo_steps()
    assert [shlex.split(step)[1] for step in steps] == [
        "watch",
        "pause",
        "resume",
        "stop",
        "checkpoints",
    ]
    # the demo prints the same commands, with its job id
    printed = {
        _wait_for_line(demo_lines, rf"{verb} it(?: live)?:\s+(.+)").group(1)
        for verb in ("watch", "pause", "resume", "stop")
    }
    assert printed == {
        f"{TRAINBUS} {verb} {job_id}" for verb in ("watch", "pause", "resume", "stop")
    }

    def command(step: str) -> list[str]:
        words = shlex.split(step.replace("JOB_ID", job_id))
        assert words[0] == ".venv/bin/trainbus"
        return [str(TRAINBUS), *words[1:]]

    def run(step: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            command(step), cwd=tmp_path, env=user_env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stdout + done.stderr
        return done

    data = tmp_path / "data"
    url, token = read_server_url(data), read_token_file(data)
    assert url is not None and token is not None
    with TrainbusClient(url, token) as api:
        watch = subprocess.Popen(
            command(steps[0]),
            cwd=tmp_path,
            env=user_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            api.wait(job_id, {"running"}, timeout=60)
            assert "pause requested" in run(steps[1]).stdout
            assert api.wait(job_id, {"paused"}, timeout=60)["state"] == "paused"
            assert "resume requested" in run(steps[2]).stdout
            assert api.wait(job_id, {"running"}, timeout=60)["state"] == "running"
            assert "stop requested" in run(steps[3]).stdout
            assert api.wait(job_id, {"stopped"}, timeout=60)["state"] == "stopped"
            watched, _ = watch.communicate(timeout=60)
        finally:
            if watch.poll() is None:
                watch.kill()
                watch.wait()
        assert watch.returncode == 0, watched
        for seen in ("job_paused", "job_resumed", f"job {job_id} stopped"):
            assert seen in watched
        assert "issued_at" not in watched
        listing = run(steps[4]).stdout
        assert "latest" in listing
