from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from trainbus.worker import JobSpec

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
    assert loc == ("model", "name")
    assert "unknown model 'resnet9000'" in message and "cnn, linear, mlp" in message


@pytest.mark.parametrize(
    ("change", "location", "says"),
    [
        ({"epochs": -1}, ("epochs",), "greater than or equal to 1"),
        ({"epochs": 10**12}, ("epochs",), "less than or equal to 100000"),
        ({"batch_size": 0}, ("batch_size",), "greater than or equal to 1"),
        ({"optimizer": {"lr": math.nan}}, ("optimizer", "lr"), "finite number"),
        ({"optimizer": {"lr": math.inf}}, ("optimizer", "lr"), "finite number"),
        ({"optimizer": {"lr": 0}}, ("optimizer", "lr"), "greater than 0"),
        ({"device": "tpu"}, ("device",), "pattern"),
        ({"code": "import os"}, ("code",), "Extra inputs"),
        ({"nonfinite_loss": "ignore"}, ("nonfinite_loss",), "'fail' or 'stop'"),
        (
            {"model": {"name": "mlp", "params": {"hidden_sizes": [10**6]}}},
            ("model", "params", "hidden_sizes", 0),
            "less than or equal to 4096",
        ),
        (
            {"model": {"name": "mlp", "params": {"module": "os.system"}}},
            ("model", "params", "module"),
            "Extra inputs",
        ),
        (
            {"dataset": {"name": "csv", "params": {"file": "../../etc/passwd"}}},
            ("dataset", "params", "file"),
            "bare file name",
        ),
        (
            {"dataset": {"name": "csv", "params": {"file": "/etc/passwd"}}},
            ("dataset", "params", "file"),
            "bare file name",
        ),
        (
            {"dataset": {"name": "iris", "params": {"n_samples": 5}}},
            ("dataset", "params", "n_samples"),
            "Extra inputs",
        ),
        ({"dataset": {"name": "mnist"}}, ("dataset", "name"), "available datasets: breast_cancer"),
        (
            {
                "dataset": {
                    "name": "synthetic_classification",
                    "params": {"n_samples": 2_000_000, "n_features": 4096},
                }
            },
            ("dataset", "params"),
            "feature values are allowed",
        ),
        ({"scheduler": {"name": "step", "params": {"warp": 1}}}, ("scheduler",), "unknown"),
        ({"early_stop": {"patience": -1}}, ("early_stop", "patience"), "greater than"),
        ({"checkpoint": {"keep_last": 0}}, ("checkpoint", "keep_last"), "greater than"),
        # booleans are not numbers (pydantic's lax mode would read true as 1)
        ({"epochs": True}, ("epochs",), "got the boolean true"),
        ({"optimizer": {"lr": True}}, ("optimizer", "lr"), "got the boolean true"),
        ({"early_stop": {"start_from_epoch": True}}, ("early_stop", "start_from_epoch"), "boolean"),
        ({"torch_threads": False}, ("torch_threads",), "got the boolean false"),
        (
            {"model": {"name": "mlp", "params": {"hidden_sizes": [64, True]}}},
            ("model", "params", "hidden_sizes", 1),
            "boolean",
        ),
        (
            {"dataset": {"name": "synthetic_regression", "params": {"n_samples": True}}},
            ("dataset", "params", "n_samples"),
            "boolean",
        ),
        # and numbers or words are not booleans (lax mode would read 0.0 and "yes" as ones)
        ({"resources": {"enabled": 0.0}}, ("resources", "enabled"), "valid boolean"),
        ({"checkpoint": {"save_on_stop": "yes"}}, ("checkpoint", "save_on_stop"), "boolean"),
        (
            {"model": {"name": "linear", "params": {"bias": 1}}},
            ("model", "params", "bias"),
            "boolean",
        ),
        # a CUDA index is written without leading zeros (torch.device refuses "cuda:04")
        ({"device": "cuda:04"}, ("device",), "pattern"),
    ],
)
def test_bad_specs_name_the_field_to_fix(
    change: dict[str, object], location: tuple[str | int, ...], says: str
) -> None:
    loc, message = error_for({**MINIMAL, **change})
    assert loc == location, (loc, message)
    assert says in message


def test_integral_numbers_in_any_json_spelling_are_integers() -> None:
    spec = JobSpec.model_validate(
        {
            **MINIMAL,
            "epochs": 3.0,
            "dataset": {"name": "synthetic_classification", "params": {"n_features": 1e2}},
        }
    )
    assert spec.epochs == 3 and spec.dataset.params["n_features"] == 100
    assert JobSpec.model_validate({**MINIMAL, "device": "cuda:10"}).device == "cuda:10"


def test_the_schema_states_every_bound_in_json_schema_keywords() -> None:
    # pydantic writes a constraint that follows a validator as a raw "ge"/"le" key, which no
    # client (schemathesis included) reads: the fuzzer then sends 0 threads as valid
    raw: list[str] = []

    def walk(node: object, path: str) -> None:
        if isinstance(node, dict):
            raw.extend(f"{path}.{key}" for key in ("ge", "gt", "le", "lt") if key in node)
            for key, value in node.items():
                walk(value, f"{path}.{key}")
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")

    walk(JobSpec.model_json_schema(), "")
    assert raw == []


def test_the_schema_carries_examples_for_openapi() -> None:
    schema = JobSpec.model_json_schema()
    assert schema["examples"][0] == MINIMAL
    for example in schema["examples"]:
        JobSpec.model_validate(example)
