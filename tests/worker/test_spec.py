from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from worker import JobSpec

MINIMAL = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 5}


def test_the_smallest_spec_gets_sensible_defaults() -> None:
    spec = JobSpec.model_validate(MINIMAL)
    assert spec.optimizer.name == "adam" and spec.batch_size == 32 and spec.device == "auto"
    assert spec.model.params == {"hidden_sizes": [64, 64], "dropout": 0.0, "activation": "relu"}
    assert spec.checkpoint.enabled and not spec.early_stop.enabled
    assert spec.batch_event_every == 1


def error_for(spec: dict[str, object]) -> tuple[tuple[str | int, ...], str]:
    with pytest.raises(ValidationError) as caught:
        JobSpec.model_validate(spec)
    first = caught.value.errors()[0]
    return tuple(first["loc"]), str(first["msg"])


def test_unknown_model_lists_the_available_ones() -> None:
    loc, message = error_for({**MINIMAL, "model": {"name": "resnet9000"}})
    assert loc == ("model",)
    assert "unknown model 'resnet9000'" in message and "cnn, linear, mlp" in message


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epochs": -1}, "epochs"),
        ({"epochs": 10**12}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": {"lr": math.nan}}, "optimizer"),
        ({"optimizer": {"lr": 0}}, "optimizer"),
        ({"device": "tpu"}, "device"),
        ({"code": "import os"}, "code"),
        ({"model": {"name": "mlp", "params": {"hidden_sizes": [10**6]}}}, "model"),
        ({"model": {"name": "mlp", "params": {"module": "os.system"}}}, "model"),
        ({"dataset": {"name": "csv", "params": {"file": "../../etc/passwd"}}}, "dataset"),
        ({"dataset": {"name": "csv", "params": {"file": "/etc/passwd"}}}, "dataset"),
        ({"scheduler": {"name": "step", "params": {"warp": 1}}}, "scheduler"),
    ],
)
def test_bad_specs_name_the_field_to_fix(change: dict[str, object], field: str) -> None:
    loc, message = error_for({**MINIMAL, **change})
    assert loc[0] == field, (loc, message)
    assert message
