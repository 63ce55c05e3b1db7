"""The job spec: what a user asks to train, validated at the edge (pydantic)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from trainbus.bus import Mode

from ._errors import SpecError
from ._numbers import Bool, Float, Int, not_a_boolean
from ._registry import default_registry

__all__ = [
    "CheckpointSpec",
    "DatasetSpec",
    "DistributedSpec",
    "EarlyStopSpec",
    "JobSpec",
    "LRPlateauSpec",
    "ModelSpec",
    "OptimizerSpec",
    "ResourcesSpec",
    "SchedulerSpec",
    "TrackersSpec",
]

_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

StallSeconds = Annotated[float, Field(gt=0, le=7 * 86_400), not_a_boolean] | None
"""How long a running job's step may stand still before it counts as stalled (none: off)."""


def _finite(value: float | None, name: str) -> float | None:
    if value is not None and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return value


def _validate_params(params_model: type[BaseModel], params: dict[str, Any]) -> dict[str, Any]:
    """Validate ``params`` against an entry's own parameter model; errors keep their field
    locations (``model.params.hidden_sizes.0``), so the API can point at the exact field."""
    try:
        return params_model.model_validate(params).model_dump(mode="json")
    except ValidationError as error:
        raise ValidationError.from_exception_data(
            error.title,
            [
                InitErrorDetails(
                    type=detail["type"],
                    loc=detail["loc"],
                    input=detail["input"],
                    ctx=detail.get("ctx", {}),
                )
                for detail in error.errors()
            ],
        ) from None


def _entry_params(kind: Literal["model", "dataset"], name: str) -> type[BaseModel]:
    """The parameter model of a registered entry.

    :raises ValueError: naming the available entries if ``name`` is unknown.
    """
    registry = default_registry()
    try:
        entry = registry.model(name) if kind == "model" else registry.dataset(name)
    except SpecError as error:
        raise ValueError(str(error)) from None
    return entry.params


def _entry_params_valid(
    kind: Literal["model", "dataset"], params: dict[str, Any], info: ValidationInfo
) -> dict[str, Any]:
    name = info.data.get("name")
    if name is None:  # the name itself was refused; that error says enough
        return params
    return _validate_params(_entry_params(kind, name), params)


def _registered_entries_schema(kind: Literal["model", "dataset", "program"]) -> Any:
    """Make the JSON schema of a model, dataset or program spec say which names the registry
    holds and which parameters each takes (``oneOf`` by name), so that OpenAPI clients and
    generated requests see the same rules the validators apply."""

    def extra(schema: dict[str, Any]) -> None:
        registry = default_registry()
        entries: Mapping[str, Any] = (
            registry.models if kind == "model"
            else registry.datasets if kind == "dataset"
            else registry.programs
        )  # fmt: skip
        schema["properties"]["name"]["enum"] = sorted(entries)
        choices = []
        for name in sorted(entries):
            params = entries[name].params.model_json_schema()
            if "$defs" in params:  # a reference would dangle here: keep the generic object
                params = {"type": "object"}
            choice: dict[str, Any] = {"properties": {"name": {"const": name}, "params": params}}
            if params.get("required"):  # its default, {}, would not do
                choice["required"] = ["params"]
            choices.append(choice)
        if choices:  # a server may have no programs
            schema["oneOf"] = choices

    return extra


class ModelSpec(BaseModel):
    """A registered model (built-in or plugin) and its parameters."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, json_schema_extra=_registered_entries_schema("model")
    )
    name: str = Field(max_length=64, examples=["mlp"])
    params: dict[str, Any] = Field(
        default_factory=dict, validate_default=True, examples=[{"hidden_sizes": [64]}]
    )

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        _entry_params("model", name)
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _entry_params_valid("model", params, info)


class DatasetSpec(BaseModel):
    """A registered dataset (built-in or plugin), its parameters and the share held out for
    validation."""

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra=_registered_entries_schema("dataset"),
    )
    name: str = Field(max_length=64, examples=["digits"])
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)
    val_fraction: Float = Field(default=0.2, ge=0.05, le=0.5)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        _entry_params("dataset", name)
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        return _entry_params_valid("dataset", params, info)


class OptimizerSpec(BaseModel):
    model_config = _STRICT
    name: Literal["sgd", "adam", "adamw"] = "adam"
    lr: Float = Field(default=1e-3, gt=0, le=10)
    momentum: Float = Field(default=0.9, ge=0, lt=1)
    weight_decay: Float = Field(default=0.0, ge=0, le=1)


_SCHEDULER_PARAMS: dict[str, dict[str, Any]] = {
    "none": {},
    "step": {
        "step_size": {"type": "number", "minimum": 1, "maximum": 100_000},
        "gamma": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    },
    "cosine": {"eta_min": {"type": "number", "minimum": 0}},
    "onecycle": {
        "max_lr": {"type": "number", "exclusiveMinimum": 0},
        "pct_start": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    },
}
"""Each scheduler's parameters as JSON schema: what ``SchedulerSpec._params`` enforces."""


def _scheduler_schema(schema: dict[str, Any]) -> None:
    schema["oneOf"] = [
        {
            "properties": {
                "name": {"const": name},
                "params": {"type": "object", "properties": params, "additionalProperties": False},
            },
            **({} if name == "none" else {"required": ["name"]}),
        }
        for name, params in _SCHEDULER_PARAMS.items()
    ]


class SchedulerSpec(BaseModel):
    """``step``: ``step_size`` (epochs), ``gamma``; ``cosine``: ``eta_min``;
    ``onecycle``: ``max_lr`` (default: 10x the optimizer's lr), ``pct_start``."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, json_schema_extra=_scheduler_schema
    )
    name: Literal["none", "step", "cosine", "onecycle"] = "none"
    params: dict[str, Float] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _params(self) -> SchedulerSpec:
        allowed = {
            "none": set(),
            "step": {"step_size", "gamma"},
            "cosine": {"eta_min"},
            "onecycle": {"max_lr", "pct_start"},
        }[self.name]
        unknown = set(self.params) - allowed
        if unknown:
            raise ValueError(
                f"scheduler {self.name!r} takes {sorted(allowed) or 'no params'}; "
                f"unknown: {sorted(unknown)}"
            )
        for key, value in self.params.items():
            _finite(value, key)
        if "step_size" in self.params and not 1 <= self.params["step_size"] <= 100_000:
            raise ValueError("step_size must be between 1 and 100000 epochs")
        if "gamma" in self.params and not 0 < self.params["gamma"] <= 1:
            raise ValueError("gamma must be in (0, 1]")
        if "pct_start" in self.params and not 0 < self.params["pct_start"] < 1:
            raise ValueError("pct_start must be in (0, 1)")
        if self.params.get("max_lr", 1.0) <= 0 or self.params.get("eta_min", 0.0) < 0:
            raise ValueError("max_lr must be positive and eta_min not negative")
        return self


class CheckpointSpec(BaseModel):
    """Checkpoints: ``last`` each ``every_n_epochs`` and the ``keep_best`` best by ``monitor``."""

    model_config = _STRICT
    enabled: Bool = True
    monitor: str = Field(default="val_loss", max_length=64)
    mode: Mode = "min"
    every_n_epochs: Annotated[int, Field(ge=1, le=100_000), not_a_boolean] | None = 1
    every_n_steps: Annotated[int, Field(ge=1, le=100_000_000), not_a_boolean] | None = None
    keep_last: Int = Field(default=1, ge=1, le=100)
    keep_best: Int = Field(default=1, ge=0, le=100)
    save_on_pause: Bool = True
    save_on_stop: Bool = True
    save_on_failure: Bool = True


class EarlyStopSpec(BaseModel):
    """Early stopping with the parameters of Lightning and Keras."""

    model_config = _STRICT
    enabled: Bool = False
    monitor: str = Field(default="val_loss", max_length=64)
    mode: Mode = "min"
    patience: Int = Field(default=3, ge=0, le=100_000)
    min_delta: Float = Field(default=0.0, ge=0)
    baseline: Float | None = None
    stopping_threshold: Float | None = None
    divergence_threshold: Float | None = None
    check_finite: Bool = True
    start_from_epoch: Int = Field(default=0, ge=0)
    restore_best: Bool = False


class LRPlateauSpec(BaseModel):
    """Keras' ReduceLROnPlateau, acting through ``set_lr`` commands."""

    model_config = _STRICT
    enabled: Bool = False
    monitor: str = Field(default="val_loss", max_length=64)
    mode: Mode = "min"
    factor: Float = Field(default=0.1, gt=0, lt=1)
    patience: Int = Field(default=2, ge=0, le=100_000)
    min_delta: Float = Field(default=1e-4, ge=0)
    cooldown: Int = Field(default=0, ge=0, le=100_000)
    min_lr: Float = Field(default=0.0, ge=0)


class ResourcesSpec(BaseModel):
    model_config = _STRICT
    enabled: Bool = True
    interval_seconds: Float = Field(default=5.0, ge=0.1, le=3600)


class DistributedSpec(BaseModel):
    """Train as a distributed data-parallel job: ``nproc_per_node`` ranks on each of
    ``nnodes`` hosts, started by torch's elastic agent, each training on its shard
    (``docs/DISTRIBUTED.md``)."""

    model_config = _STRICT
    nproc_per_node: Int = Field(
        ge=1,
        le=64,
        description="Ranks (processes) on each host; on the server's host the job holds one "
        "device slot for each.",
    )
    nnodes: Int = Field(
        default=1,
        ge=1,
        le=64,
        description="Hosts of the job: the server's, and one `trainbus agent` for each other "
        "host (docs/DISTRIBUTED.md, Several hosts).",
    )
    backend: Literal["gloo", "nccl"] = Field(
        default="gloo", description="gloo (CPU or CUDA) or nccl (CUDA, one device per rank)."
    )
    collective_timeout_seconds: float = Field(
        default=300.0,
        ge=5.0,
        le=86400.0,
        allow_inf_nan=False,
        description=(
            "How long a collective waits for a rank before the job fails naming the rank that "
            "stalled: longer than anything rank 0 does between two batches (a checkpoint, the "
            "controllers' decision at an epoch's end)."
        ),
    )
    join_timeout_seconds: Int = Field(
        default=600,
        ge=5,
        le=86400,
        description="With several hosts: how long the job waits for the agents of its other "
        "hosts to join before it fails saying which did not.",
    )


class TensorBoardSpec(BaseModel):
    """TensorBoard event files in the job's folder (or under the server's tensorboard_dir)."""

    model_config = _STRICT


class MLflowSpec(BaseModel):
    """One MLflow run per job; unset fields take the server's defaults."""

    model_config = _STRICT
    tracking_uri: str | None = Field(default=None, max_length=2000)
    experiment: str | None = Field(default=None, min_length=1, max_length=250)
    log_best_checkpoint: Bool = False


class WandbSpec(BaseModel):
    """One Weights & Biases run per job; unset fields take the server's defaults."""

    model_config = _STRICT
    project: str | None = Field(default=None, min_length=1, max_length=128)
    entity: str | None = Field(default=None, min_length=1, max_length=128)
    mode: Literal["online", "offline", "disabled"] | None = None


class TrackersSpec(BaseModel):
    """Experiment trackers: each present section turns its exporter on."""

    model_config = _STRICT
    tensorboard: TensorBoardSpec | None = None
    mlflow: MLflowSpec | None = None
    wandb: WandbSpec | None = None
    log_every_n_steps: Int = Field(default=50, ge=0, le=1_000_000)


class JobSpec(BaseModel):
    """A training job. The smallest valid one::

    {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 5}
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 5},
                {
                    "name": "digits-cnn",
                    "model": {"name": "cnn", "params": {"channels": [16, 32]}},
                    "dataset": {"name": "digits", "val_fraction": 0.2},
                    "optimizer": {"name": "adamw", "lr": 0.003},
                    "scheduler": {"name": "cosine"},
                    "epochs": 10,
                    "batch_size": 64,
                    "early_stop": {"enabled": True, "monitor": "val_accuracy", "mode": "max"},
                },
            ]
        },
    )

    name: str | None = Field(default=None, max_length=200)
    model: ModelSpec
    dataset: DatasetSpec
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec)
    epochs: Int = Field(ge=1, le=100_000)
    batch_size: Int = Field(default=32, ge=1, le=65_536)
    seed: Int = Field(default=0, ge=0, le=2**32 - 1)
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda|cuda:(0|[1-9][0-9]?))$")
    devices: Int = Field(
        default=1,
        ge=1,
        le=64,
        description="Device slots of the device's kind the job holds while it runs (CPU "
        "slots: its share of the cores; CUDA: the devices its worker sees): it waits until "
        "they are free. auto takes CUDA slots on a server that has them.",
    )
    distributed: DistributedSpec | None = Field(
        default=None,
        description="Train with several ranks (torch.distributed); none: one process.",
    )
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    batch_event_every: Int = Field(default=1, ge=1, le=1_000_000)
    nonfinite_loss: Literal["fail", "stop"] = "fail"
    torch_threads: Annotated[int, Field(ge=1, le=256), not_a_boolean] | None = None
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    early_stop: EarlyStopSpec = Field(default_factory=EarlyStopSpec)
    lr_plateau: LRPlateauSpec = Field(default_factory=LRPlateauSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    trackers: TrackersSpec = Field(default_factory=TrackersSpec)
    stall_timeout_seconds: StallSeconds = Field(
        default=None,
        description="A running job whose step does not advance for this long is stalled: "
        "job_stalled is published with its last step and the worker's stack (none: off).",
    )
    on_stall: Literal["warn", "fail"] = Field(
        default="warn",
        description="What follows job_stalled: warn (it goes on) or fail (the worker is ended).",
    )
    memory_limit_mb: Annotated[int, Field(ge=256, le=2**30), not_a_boolean] | None = Field(
        default=None,
        description="Address space the job's worker process may map, in MiB (torch alone "
        "maps about 1 GiB); past it allocations fail and the job ends failed, naming the "
        "limit. Never more than the server's worker_memory_limit_bytes (none: that setting). "
        "Not applied to a CUDA job: the CUDA driver reserves far more than it uses.",
    )

    @model_validator(mode="after")
    def _distributed_fits(self) -> JobSpec:
        distributed = self.distributed
        if distributed is None:
            return self
        ranks = distributed.nproc_per_node
        if self.devices not in (1, ranks):
            raise ValueError(
                f"a distributed job holds one device slot per rank ({ranks}), but devices is "
                f"{self.devices}: leave devices out or set it to nproc_per_node"
            )
        if distributed.backend == "nccl" and self.device == "cpu":
            raise ValueError("backend 'nccl' needs CUDA: use device 'cuda' or backend 'gloo'")
        if ranks > 1 and self.device.startswith("cuda:"):
            raise ValueError(
                f"device {self.device!r} names one CUDA device, but the job has {ranks} ranks: "
                "use device 'cuda' (one device per rank)"
            )
        return self
