"""The service's settings: read once at start-up (``TRAINBUS_`` variables), passed down."""

from __future__ import annotations

import ipaddress
import os
import re
import sys
from pathlib import Path
from typing import Literal

import psutil
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["Settings", "default_data_dir", "device_entries", "is_loopback_host"]


def default_data_dir() -> Path:
    """The platform's per-user data folder for trainbus (``~/.local/share/trainbus`` on Linux)."""
    home = Path.home()
    if sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif sys.platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        base = Path(os.environ.get("XDG_DATA_HOME") or home / ".local" / "share")
    return base / "trainbus"


def is_loopback_host(host: str) -> bool:
    """True when ``host`` only listens on the loopback interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


_DEVICE_ENTRY = re.compile(r"^(cpu:[1-9][0-9]{0,3}|cuda:(0|[1-9][0-9]?))$")


def device_entries(value: str | list[str]) -> list[str]:
    """The ``devices`` setting as entries (``auto``, or ``cpu:N`` and ``cuda:K``).

    :raises ValueError: saying which entry is wrong and what the setting takes.
    """
    entries = value.split(",") if isinstance(value, str) else list(value)
    entries = [entry.strip().lower() for entry in entries if entry.strip()]
    if entries in ([], ["auto"]):
        return ["auto"]
    takes = (
        "devices takes auto, or entries cpu:N (N CPU slots, 1 to 9999) and cuda:K (CUDA "
        "device K, 0 to 99), e.g. 'cpu:2' or 'cuda:0,cuda:1,cpu:1'"
    )
    for entry in entries:
        if not _DEVICE_ENTRY.match(entry):
            raise ValueError(f"devices entry {entry!r} is not valid: {takes}")
    if len(set(entries)) < len(entries):
        raise ValueError(f"devices lists an entry twice ({', '.join(entries)}): {takes}")
    if sum(entry.startswith("cpu:") for entry in entries) > 1:
        raise ValueError(f"devices has more than one cpu:N entry: give the CPU slots once; {takes}")
    return entries


def _default_origins() -> list[str]:
    return [
        "http://127.0.0.1",
        "http://localhost",
        "http://[::1]",
        "https://127.0.0.1",
        "https://localhost",
        "https://[::1]",
    ]


class Settings(BaseSettings):
    """Everything the service can be configured with.

    Each field can be set in the environment as ``TRAINBUS_<FIELD>`` (for example
    ``TRAINBUS_TOKEN``, ``TRAINBUS_MAX_RUNNING_JOBS``; lists as JSON). The settings are read
    once, at start-up; no other module reads the environment.
    """

    model_config = SettingsConfigDict(env_prefix="TRAINBUS_", extra="ignore")

    host: str = Field(
        default="127.0.0.1", description="Address to bind; loopback unless a token is set."
    )
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port (0: any free port).")
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Folder for the SQLite database and the checkpoints.",
    )
    token: SecretStr | None = Field(
        default=None,
        description="API token. Generated and printed once at start when absent; required "
        "to bind a non-loopback address.",
    )
    max_running_jobs: int = Field(default=1, ge=1, description="Jobs that train at the same time.")
    devices: str | list[str] = Field(
        default="auto",
        description="The device slots jobs are scheduled on: auto (every CUDA device torch or "
        "NVML finds, and max_running_jobs CPU slots), or a list of cpu:N (N CPU slots, each an "
        "equal share of the cores) and cuda:K (CUDA device K), as JSON or comma-separated: "
        "'cpu:2', 'cuda:0,cuda:1,cpu:1'. A job waits until the devices it asks for are free.",
    )
    simulated_cuda_devices: int = Field(
        default=0,
        ge=0,
        le=64,
        description="For scheduling tests on a machine without GPUs: this many CUDA slots "
        "(cuda:0...) in place of real ones; their jobs get CUDA_VISIBLE_DEVICES as on a GPU "
        "machine but train on the CPU.",
    )
    metrics_require_token: bool = Field(
        default=False, description="Guard /metrics with the token too."
    )
    allowed_origins: list[str] = Field(
        default_factory=_default_origins,
        description="Origins allowed to open WebSockets (and CORS). Ports are ignored for "
        "loopback origins; '*' allows any origin.",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the server answers to besides IP addresses, localhost and "
        "the bind address (DNS-rebinding defence); '*.example.com' matches subdomains, '*' "
        "any name.",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest request body accepted (413 beyond); a job spec needs a few KiB.",
    )
    socket_send_buffer_bytes: int | None = Field(
        default=256 * 1024,
        ge=4096,
        description="Kernel send buffer of each connection (none: the kernel's autotuning, up "
        "to 4 MiB a connection): bounds what a client that never reads can hold.",
    )
    request_timeout: float = Field(
        default=15.0,
        gt=0,
        description="Seconds a connection may take to send a complete request (from connecting, "
        "or from its first byte after a keep-alive pause) before it is closed.",
    )
    reserved_file_descriptors: int = Field(
        default=64,
        ge=0,
        description="File descriptors kept for the server's own files (checkpoints, the "
        "database, logs): a connection that would use one of the last this many under the "
        "open-file limit is closed at once.",
    )
    ws_buffer_size: int = Field(
        default=2048, ge=1, description="Events buffered per WebSocket client before it gets a gap."
    )
    ws_max_lag: int = Field(
        default=10_000,
        ge=1,
        description="Events a WebSocket client may miss before the server closes it with "
        "code 4008 (the reason names the seq to resume after).",
    )
    ws_max_message_events: int = Field(
        default=1000, ge=1, description="Most events sent in one WebSocket message (a JSON array)."
    )
    ws_max_message_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        description="Most bytes of events in one WebSocket message, under the 1 MiB a client "
        "library takes by default (websockets' max_size); a larger single event goes alone.",
    )
    ws_ping_interval: float | None = Field(
        default=20.0, description="Seconds between WebSocket keep-alive pings (none: off)."
    )
    ws_ping_timeout: float | None = Field(
        default=20.0, description="Seconds to wait for a pong before dropping the connection."
    )
    ws_close_timeout: float = Field(
        default=5.0,
        gt=0,
        description="Seconds to wait for a slow client to take a close frame; a connection "
        "still open this long after its stream ended is dropped (a client that never reads).",
    )
    ws_send_timeout: float = Field(
        default=30.0,
        gt=0,
        description="Seconds one WebSocket message (live or replayed) may wait for a client "
        "that does not read; past it the client is too slow and is let go (4008 where the "
        "close frame still fits, else the connection is dropped). With the close timeout, "
        "the bound is that of an idle client that stops answering pings (about 40 s).",
    )
    ws_batch_interval: float = Field(
        default=0.01,
        ge=0,
        description="Seconds the live fan-out gathers events under load before a round of "
        "sends (at most this much added latency; far fewer messages).",
    )
    hub_buffer_size: int = Field(
        default=65_536, ge=1, description="Events the server's live fan-out buffers off the bus."
    )
    store_catch_up_timeout: float = Field(
        default=10.0,
        gt=0,
        description="Seconds a WebSocket replay waits for the store to catch up.",
    )
    metrics_retention_seconds: float = Field(
        default=3600.0, gt=0, description="How long metrics of ended jobs stay on /metrics."
    )
    run_jobs_in: Literal["process", "thread"] = Field(
        default="process",
        description="process: each job runs in a worker process of its own (isolated, in "
        "parallel, supervised); thread: on a thread of the server (for debugging).",
    )
    stop_grace_seconds: float = Field(
        default=30.0,
        gt=0,
        description="Seconds a stopped job's worker may take to stop at a batch boundary "
        "before it gets SIGTERM, and then SIGKILL.",
    )
    distributed_rendezvous: str = Field(
        default="localhost:0",
        pattern=r"^[A-Za-z0-9._-]+:[0-9]{1,5}$",
        description="host:port where the ranks of a distributed job meet (the store of its "
        "elastic agent); port 0: a free port for each job.",
    )
    run_lost_seconds: float = Field(
        default=120.0,
        gt=0,
        description="An SDK run none of whose processes has been connected this long ends "
        "interrupted (it continues when a process of it attaches again).",
    )
    shutdown_timeout: float = Field(
        default=30.0, gt=0, description="Seconds to checkpoint and pause running jobs at shutdown."
    )
    resource_interval_seconds: float = Field(
        default=5.0, gt=0, description="Seconds between machine resource samples."
    )
    store_batch_events: Literal["all", "every_n", "none_after_end"] = Field(
        default="all",
        description="Which per-batch events the store keeps: all (exact replay), every_n, "
        "or none_after_end (dropped when the job ends).",
    )
    max_job_memory_bytes: int | None = Field(
        default=None,
        ge=1,
        description="Memory one job may take, by the estimate made from its spec at submission "
        "(larger jobs are refused with 422); default: half of the machine's memory.",
    )
    worker_memory_limit_bytes: int | None = Field(
        default=None,
        ge=256 * 2**20,
        description="Address space each job's worker process may map (RLIMIT_AS; torch alone "
        "maps about 1 GiB): past it allocations fail and the job ends failed, naming the "
        "limit. A job's memory_limit_mb may ask for less. Not applied to CUDA jobs (the CUDA "
        "driver reserves far more address space than it uses). Default: no limit.",
    )
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Experiment trackers on for every job (a job's spec turns others on); "
        "each needs its extra installed (pip install 'trainbus[mlflow]').",
    )
    tensorboard_dir: Path | None = Field(
        default=None,
        description="Folder for TensorBoard runs (one sub-folder per job); none: each job's "
        "own folder, <data_dir>/jobs/<id>/tensorboard.",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None, description="Default MLflow tracking server (http://host:5000)."
    )
    mlflow_experiment: str = Field(default="trainbus", description="Default MLflow experiment.")
    wandb_project: str = Field(default="trainbus", description="Default W&B project.")
    wandb_entity: str | None = Field(default=None, description="Default W&B entity.")
    wandb_mode: Literal["online", "offline", "disabled"] = Field(
        default="online", description="Default W&B mode (offline: files only, synced later)."
    )
    tracker_max_buffered: int = Field(
        default=10_000,
        ge=1,
        description="Records each tracker holds while it is slow or down; past it the oldest "
        "per-step records are dropped and counted.",
    )
    log_level: Literal["critical", "error", "warning", "info", "debug", "trace"] = "info"

    @property
    def job_memory_limit(self) -> int:
        """``max_job_memory_bytes``, else half of the machine's physical memory."""
        if self.max_job_memory_bytes is not None:
            return self.max_job_memory_bytes
        return int(psutil.virtual_memory().total // 2)

    @field_validator("devices")
    @classmethod
    def _device_slots(cls, value: str | list[str]) -> list[str]:
        return device_entries(value)

    @field_validator("token")
    @classmethod
    def _token_not_blank(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 8:
            raise ValueError("the token must be at least 8 characters long")
        return value

    @property
    def loopback_only(self) -> bool:
        """True when the server binds the loopback interface only."""
        return is_loopback_host(self.host)
