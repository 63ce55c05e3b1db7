"""Hostile input, generated: schemathesis with every check it has, over the whole OpenAPI
document, against a real server with the real job side.

Valid and invalid requests per operation, with the token so they reach the handlers: no 5xx,
every status documented, every body matching its schema, invalid data refused, valid data
accepted, the token not ignored. Jobs that valid specs create are stopped at once, so the
fuzzing never leaves training running.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import FlakyStrategyDefinition, Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import Failure, FailureGroup
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from tests.api.fuzz import operations as all_operations
from tests.api.server import LiveServer, make_settings, run_server
from trainbus.api import create_app
from trainbus.bus import UnknownEventName, event_type_for
from trainbus.worker._datasets import MAX_VALUES

from .conftest import SOAK, record, sized

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION_AND_MODE = sized(12, 250)
MACHINE_RUNS = 5
"""Runs of the state machine, at most, for one that Hypothesis does not cut short."""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    settings = make_settings(tmp_path_factory.mktemp("data"), resource_interval_seconds=0.5)
    with run_server(create_app(settings), settings) as live:
        yield live


def _all_checks() -> list[Any]:
    load_all_checks()
    checks = list(CHECKS.get_all())
    assert len(checks) >= 10, [check.__name__ for check in checks]
    return checks


# Rules JSON Schema cannot state. Generated valid requests are brought within them (mapped, not
# filtered: a filter that rejects most draws makes Hypothesis give up on the operation).


def _dataset_params(case: Any) -> dict[str, Any] | None:
    body = case.body if isinstance(case.body, dict) else {}
    dataset = body.get("dataset")
    params = dataset.get("params") if isinstance(dataset, dict) else None
    return params if isinstance(params, dict) else None


def _whole_number(value: Any) -> int | None:
    """``value`` as the server reads an integer field: JSON Schema's ``integer`` admits any
    number with a zero fractional part, so schemathesis sends ``1001.0`` and ``1e3`` too (and
    pydantic takes them); booleans are not numbers there. None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _dataset_size(case: Any) -> tuple[int, int] | None:
    """``(n_samples, n_features)`` of a synthetic dataset in the body (defaults filled in),
    None where either is not a whole number (then the schema itself refuses it)."""
    params = _dataset_params(case) or {}
    samples = _whole_number(params.get("n_samples", 2_000))
    features = _whole_number(params.get("n_features", 20))
    return None if samples is None or features is None else (samples, features)


def _over_dataset_budget(case: Any) -> bool:
    """Synthetic datasets bound ``n_samples x n_features`` (worker ``MAX_VALUES``): a product
    of two fields, which JSON Schema cannot state (short of one ``anyOf`` branch per value of
    ``n_features`` over 25, some 4,000), so the schema cannot carry it."""
    size = _dataset_size(case)
    return size is not None and size[0] * size[1] > MAX_VALUES


def _needs_missing_hardware(case: Any) -> bool:
    """``cuda:N`` or fp16 precision on a machine without that GPU is refused (422)."""
    body = case.body if isinstance(case.body, dict) else {}
    if body.get("precision") == "fp16" and torch.cuda.device_count() == 0:
        return True
    device = body.get("device", "auto")
    if not isinstance(device, str) or not device.startswith("cuda"):
        return False
    return int(device.partition(":")[2] or 0) >= torch.cuda.device_count()


def _asks_for_more_devices_than_lent(case: Any) -> bool:
    """A job asks for at most the device slots the server lends of its kind (422 beyond): here
    one CPU slot (``max_running_jobs``) and this machine's CUDA devices, a fact about the
    server that no schema says."""
    body = case.body if isinstance(case.body, dict) else {}
    devices = _whole_number(body.get("devices", 1))
    if devices is None:
        return False
    device = body.get("device", "auto")
    cuda = torch.cuda.device_count()
    lent = cuda if device == "cuda" or (device == "auto" and cuda) else 1
    return devices > lent


def _names_unknown_event_types(case: Any) -> bool:
    """``types`` is documented as free text so that an unknown name is answered with the list
    of valid names (422) rather than a bare pattern mismatch."""
    raw = (case.query or {}).get("types")
    if not isinstance(raw, str):
        return False
    try:
        for name in raw.split(","):
            if name.strip():
                event_type_for(name.strip())
    except UnknownEventName:
        return True
    return False


def _names_a_missing_dataset_file(case: Any) -> bool:
    """A CSV dataset's file must exist in the server's data folder at submission (422 naming
    ``dataset.params.file``): a fact about the server's disk, not something a schema says."""
    body = case.body if isinstance(case.body, dict) else {}
    dataset = body.get("dataset")
    return isinstance(dataset, dict) and dataset.get("name") == "csv"


def _invalid_part_not_sent(case: Any) -> bool:
    """A query parameter whose value is an empty list is not sent at all (no ``name=`` in the
    URL). Schemathesis makes invalid cases that way (``{"limit": 1, "": []}``: an unknown
    parameter, invalid) and then expects a refusal; but the request that reaches the server is
    the valid ``?limit=1``, which it rightly answers 200 (soak run, ST201 on ``GET /jobs``)."""
    query = case.query if isinstance(case.query, dict) else {}
    return any(value == [] for value in query.values())


FEATURES = {"digits": 64, "iris": 4, "wine": 13, "breast_cancer": 30}
"""Feature counts of the built-in real datasets."""


def _model_does_not_fit_the_dataset(case: Any) -> bool:
    """The ``cnn`` takes square single-channel images, so the dataset's feature count must be
    a square: a rule across two sections, checked when the model is built at submission."""
    body = case.body if isinstance(case.body, dict) else {}
    model, dataset = body.get("model"), body.get("dataset")
    if not isinstance(model, dict) or model.get("name") != "cnn" or not isinstance(dataset, dict):
        return False
    name = str(dataset.get("name", ""))
    size = _dataset_size(case)
    features = FEATURES.get(name) if not name.startswith("synthetic") else size and size[1]
    return features is not None and math.isqrt(max(features, 0)) ** 2 != features


def _reads_spec_text(case: Any) -> bool:
    """``POST /specs/parse`` takes any text and answers a 422 for text that is not a YAML or
    JSON mapping: the point of the route, which no schema of a string states."""
    return getattr(case, "method", None) == "POST" and getattr(case, "path", None) == "/specs/parse"


def _outside_the_schema(case: Any) -> bool:
    return (
        _reads_spec_text(case)
        or _over_dataset_budget(case)
        or _model_does_not_fit_the_dataset(case)
        or _needs_missing_hardware(case)
        or _asks_for_more_devices_than_lent(case)
        or (isinstance(case.body, dict) and bool(case.body.get("distributed")))
        or _names_unknown_event_types(case)
        or _names_a_missing_dataset_file(case)
    )


def _within_the_rules(case: Any) -> Any:
    if _over_dataset_budget(case):
        params = _dataset_params(case)
        size = _dataset_size(case)
        assert params is not None and size is not None
        params["n_samples"] = max(10, MAX_VALUES // size[1])
    if _needs_missing_hardware(case):
        case.body.update(device="cpu", precision="fp32")
    if _asks_for_more_devices_than_lent(case):
        case.body["devices"] = 1
    if _names_unknown_event_types(case):
        case.query["types"] = "fit_epoch_end"
    if _names_a_missing_dataset_file(case):
        case.body["dataset"].update(name="iris", params={})
    if _model_does_not_fit_the_dataset(case):
        case.body["model"] = {"name": "mlp"}
    if isinstance(case.body, dict) and case.body.get("distributed"):
        # ranks need device slots of their own: this server lends one
        case.body.pop("distributed")
    if isinstance(case.body, dict) and case.body.get("trackers"):
        # a tracker needs its service (an MLflow server, a W&B account): none is fuzzed
        case.body.pop("trackers")
    return case


def _strategy(operation: Any, mode: GenerationMode) -> Any:
    strategy = operation.as_strategy(mode)
    return strategy.map(_within_the_rules) if mode is GenerationMode.POSITIVE else strategy


def _excluded_checks(case: Any) -> list[Any]:
    """``negative_data_rejection`` expects a refusal of what was sent; not where the invalid
    part never left. ``positive_data_acceptance`` expects any schema-valid text to parse as a
    spec (every other check still applies)."""
    excluded = [negative_data_rejection] if _invalid_part_not_sent(case) else []
    return [*excluded, positive_data_acceptance] if _reads_spec_text(case) else excluded


def _stop_created_job(server: LiveServer, response: Any) -> None:
    if response.request.method == "POST" and response.status_code == 201:
        job_id = response.json()["id"]
        httpx.post(f"{server.url}/jobs/{job_id}/stop", headers=server.headers, timeout=10)


def test_every_check_holds_for_generated_requests(server: LiveServer) -> None:
    operations = all_operations(server)
    checks = _all_checks()
    failures: list[str] = []
    counts = {"cases": 0, "operations": len(operations)}
    statuses: dict[int, int] = {}
    started = time.monotonic()
    for operation, mode in itertools.product(operations, list(GenerationMode)):

        @given(case=_strategy(operation, mode))
        @settings(
            max_examples=EXAMPLES_PER_OPERATION_AND_MODE,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=not SOAK,  # the same cases in CI; new ones on every soak
            database=None,
        )
        def check(case: Any) -> None:
            counts["cases"] += 1
            response = case.call(base_url=server.url, headers=server.headers, timeout=30)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            _stop_created_job(server, response)
            try:
                case.validate_response(
                    response,
                    checks=checks,
                    excluded_checks=_excluded_checks(case),
                    headers=server.headers,
                )
            except (Failure, FailureGroup, AssertionError) as failure:
                failures.append(f"{case.method} {case.formatted_path}: {str(failure)[:1500]}")

        try:
            check()
        except Unsatisfiable:
            assert mode is GenerationMode.NEGATIVE  # an operation without parameters
    elapsed = time.monotonic() - started
    health = httpx.get(server.url + "/healthz", timeout=5)
    record(
        "6a schema fuzz",
        checks=[check.__name__ for check in checks],
        operations=counts["operations"],
        cases=counts["cases"],
        statuses={str(code): count for code, count in sorted(statuses.items())},
        failures=len(failures),
        seconds=round(elapsed, 2),
    )
    assert failures == [], "\n".join(failures[:20])
    assert not any(code >= 500 for code in statuses), statuses
    assert counts["cases"] >= counts["operations"] * 2
    assert health.status_code == 200


def test_generated_sequences_of_calls_hold_every_check(server: LiveServer) -> None:
    """Stateful: schemathesis links operations (a created job's id flows into pause, resume,
    stop, events, checkpoints and delete) and runs random sequences, each step validated by
    its checks (``use_after_free`` and ``ensure_resource_availability`` included)."""
    document = httpx.get(server.url + "/openapi.json", headers=server.headers).json()
    machine = schemathesis.openapi.from_dict(document).as_state_machine()
    steps: list[tuple[str, str, int]] = []

    class Sequences(machine):  # type: ignore[misc,valid-type]
        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": server.url, "headers": server.headers, "timeout": 30}

        def after_call(self, response: Any, case: Any) -> None:
            steps.append((case.method, case.path, response.status_code))
            _stop_created_job(server, response)

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            if response.status_code == 422 and _outside_the_schema(case):
                return  # valid by the schema, but outside a rule it cannot state (above)
            try:
                case.validate_response(
                    response,
                    additional_checks=additional_checks,
                    excluded_checks=_excluded_checks(case),
                    transport_kwargs=kwargs or None,
                    recorder=self.recorder,
                )
            except BaseException:
                check_failed.append(True)
                raise

    check_failed: list[bool] = []
    inconsistent_runs = 0
    started = time.monotonic()
    for _ in range(MACHINE_RUNS):
        try:
            Sequences.run(
                settings=settings(
                    max_examples=sized(10, 200),
                    stateful_step_count=6,
                    deadline=None,
                    suppress_health_check=list(HealthCheck),
                    derandomize=not SOAK,
                    database=None,
                )
            )
            break
        except FlakyStrategyDefinition:
            # What a step draws depends on the server's answers (a listing's jobs, a job's
            # state), which change as jobs train and end: replaying a prefix can draw
            # differently and Hypothesis stops the run. Unless a check had failed, that says
            # nothing about the server; schemathesis' own runner treats it the same way (a
            # success, and it runs the machine again). It failed 4 of 5 soak-size runs here.
            if check_failed:
                raise
            inconsistent_runs += 1
    else:
        pytest.fail(f"every one of {MACHINE_RUNS} runs of the state machine was cut short")
    elapsed = time.monotonic() - started
    statuses = sorted({status for _, _, status in steps})
    on_created_jobs = sum(1 for _, _, status in steps if status in (202, 204))
    record(
        "6a stateful fuzz",
        steps=len(steps),
        operations=len({(method, path) for method, path, _ in steps}),
        statuses=statuses,
        commands_and_deletes_on_created_jobs=on_created_jobs,
        runs_cut_short_by_inconsistent_generation=inconsistent_runs,
        seconds=round(elapsed, 2),
    )
    assert not any(status >= 500 for status in statuses), statuses
    assert on_created_jobs > 0, "no sequence reached a job it created"
    assert httpx.get(server.url + "/healthz", timeout=5).status_code == 200


@pytest.mark.parametrize(
    ("n_samples", "n_features"),
    [(50_000, 1001), (50_000, 1001.0), (5e4, 1001), (5e4, 1.001e3), (2_000_000, 26.0)],
)
def test_the_size_rule_reads_every_form_of_an_integer(n_samples: Any, n_features: Any) -> None:
    """Soak regression: schemathesis sent ``n_features=1001.0``, the size rule read only ints,
    and the server's 422 for a body over its budget failed the run. Every form JSON Schema's
    ``integer`` admits is over the budget here, and brought within it."""

    params: dict[str, Any] = {"n_samples": n_samples, "n_features": n_features}
    case = SimpleNamespace(
        body={"dataset": {"name": "synthetic_classification", "params": params}}, query={}
    )
    assert _over_dataset_budget(case) and _outside_the_schema(case)
    _within_the_rules(case)
    assert not _over_dataset_budget(case)
    assert params["n_samples"] * params["n_features"] <= MAX_VALUES
    # a boolean or a fraction is no integer to the schema: the server refuses it as invalid
    params.update(n_samples=50_000, n_features=1001.5)
    assert not _over_dataset_budget(case)
    params.update(n_features=True)
    assert not _over_dataset_budget(case)
