"""Hostile input, generated: schemathesis with every check it has, over the whole OpenAPI
document, against a real server with the real job side (item 6a of issue 7).

Valid and invalid requests per operation, with the token so they reach the handlers: no 5xx,
every status documented, every body matching its schema, invalid data refused, valid data
accepted, the token not ignored. Jobs that valid specs create are stopped at once, so the
fuzzing never leaves training running.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CHECKS, load_all_checks
from schemathesis.core.failures import Failure, FailureGroup

from api import create_app
from bus import UnknownEventName, event_type_for
from tests.api.fuzz import operations as all_operations
from tests.api.server import LiveServer, make_settings, run_server
from worker._datasets import MAX_VALUES

from .conftest import SOAK, record, sized

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION_AND_MODE = sized(12, 250)


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


def _within_dataset_budget(case: Any) -> bool:
    """Synthetic datasets bound ``n_samples x n_features`` (worker ``MAX_VALUES``): a rule
    across two fields that JSON Schema cannot state, so generated valid specs keep to it."""
    body = case.body if isinstance(case.body, dict) else {}
    dataset = body.get("dataset")
    params = dataset.get("params") if isinstance(dataset, dict) else None
    if not isinstance(params, dict):
        return True
    samples, features = params.get("n_samples", 2_000), params.get("n_features", 20)
    return not (isinstance(samples, int) and isinstance(features, int)) or (
        samples * features <= MAX_VALUES
    )


def _on_present_hardware(case: Any) -> bool:
    """A spec may name ``cuda:N``; on a machine without that GPU the server refuses it (422)."""
    body = case.body if isinstance(case.body, dict) else {}
    device = body.get("device", "auto")
    if not isinstance(device, str) or not device.startswith("cuda"):
        return True
    index = int(device.partition(":")[2] or 0)
    return index < torch.cuda.device_count()


def _known_event_types(case: Any) -> bool:
    """``types`` is documented as free text so that an unknown name is answered with the list
    of valid names (422) rather than a bare pattern mismatch; valid requests name real ones."""
    raw = (case.query or {}).get("types")
    if not isinstance(raw, str):
        return True
    try:
        for name in raw.split(","):
            if name.strip():
                event_type_for(name.strip())
    except UnknownEventName:
        return False
    return True


def _strategy(operation: Any, mode: GenerationMode) -> Any:
    strategy = operation.as_strategy(mode)
    if mode is GenerationMode.POSITIVE:
        for rule in (_within_dataset_budget, _on_present_hardware, _known_event_types):
            strategy = strategy.filter(rule)
    return strategy


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
                case.validate_response(response, checks=checks, headers=server.headers)
            except (Failure, FailureGroup, AssertionError) as failure:
                failures.append(f"{case.method} {case.formatted_path}: {str(failure)[:600]}")

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
