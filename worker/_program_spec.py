"""The spec of a program job: a training program the server's operator registered
(``trainbus.programs`` entry points), named with its parameters, run by the server in a
worker process of its own. The request names the program; it never carries its code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WrapValidator,
    field_validator,
)
from pydantic_core.core_schema import ValidatorFunctionWrapHandler

from ._errors import SpecError
from ._registry import default_registry
from ._spec import (
    EarlyStopSpec,
    JobSpec,
    LRPlateauSpec,
    StallSeconds,
    _registered_entries_schema,
    _validate_params,
)

__all__ = ["JobRequest", "ProgramCall", "ProgramSpec", "is_program_spec", "parse_job_spec"]


def _program_params(name: str) -> type[BaseModel]:
    """:raises ValueError: naming the registered programs if ``name`` is unknown."""
    try:
        return default_registry().program(name).params
    except SpecError as error:
        raise ValueError(str(error)) from None


class ProgramCall(BaseModel):
    """A registered program and its parameters (validated against the program's own model)."""

    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False, json_schema_extra=_registered_entries_schema("program")
    )
    name: str = Field(max_length=64, examples=["digits_loop"])
    params: dict[str, Any] = Field(default_factory=dict, validate_default=True)

    @field_validator("name")
    @classmethod
    def _known_name(cls, name: str) -> str:
        _program_params(name)
        return name

    @field_validator("params")
    @classmethod
    def _valid_params(cls, params: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        name = info.data.get("name")
        if name is None:  # the name itself was refused; that error says enough
            return params
        return _validate_params(_program_params(name), params)


class ProgramSpec(BaseModel):
    """A job that runs a registered program. The smallest valid one::

    {"program": {"name": "digits_loop"}}
    """

    model_config = ConfigDict(
        extra="forbid",
        allow_inf_nan=False,
        json_schema_extra={
            "examples": [{"name": "digits", "program": {"name": "digits_loop", "params": {}}}]
        },
    )

    name: str | None = Field(default=None, max_length=200)
    program: ProgramCall
    early_stop: EarlyStopSpec = Field(
        default_factory=EarlyStopSpec,
        description="Decided on the server at each epoch's end the program reports.",
    )
    lr_plateau: LRPlateauSpec = Field(default_factory=LRPlateauSpec)
    stall_timeout_seconds: StallSeconds = Field(
        default=None,
        description="A running program whose step does not advance for this long is stalled "
        "(none: off).",
    )
    on_stall: Literal["warn", "fail"] = "warn"


def is_program_spec(spec: Mapping[str, Any]) -> bool:
    """Whether a job spec (stored, or as submitted) runs a registered program."""
    return "program" in spec


def parse_job_spec(spec: Mapping[str, Any] | JobSpec | ProgramSpec) -> JobSpec | ProgramSpec:
    """A submitted or stored spec as the model it is: a program's, or the built-in trainer's.

    :raises pydantic.ValidationError: field by field.
    """
    if isinstance(spec, JobSpec | ProgramSpec):
        return spec
    if is_program_spec(spec):
        return ProgramSpec.model_validate(spec)
    return JobSpec.model_validate(spec)


def _by_kind(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, Mapping):
        return parse_job_spec(value)
    return handler(value)


JobRequest = Annotated[JobSpec | ProgramSpec, WrapValidator(_by_kind)]
"""What ``POST /jobs`` takes: a built-in job's spec, or one with ``program`` (a registered
program's). Errors point at the fields of the kind the body is, not at both."""
