"""Device slots: what the ``devices`` setting lends, what a spec asks for, what a job waits for,
and what its worker process sees."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from trainbus.api import Settings
from trainbus.worker import DevicePool, DeviceSlot, JobSpec, SpecError, device_slots

SPEC = {"model": {"name": "mlp"}, "dataset": {"name": "digits"}, "epochs": 1}


def _spec(**fields: object) -> dict[str, object]:
    return JobSpec.model_validate({**SPEC, **fields}).model_dump(mode="json")


def test_auto_lends_every_cuda_device_and_a_cpu_slot_per_running_job() -> None:
    slots = device_slots(["auto"], default_cpu_slots=2, cuda_count=2, visible="")
    assert [slot.name for slot in slots] == ["cuda:0", "cuda:1", "cpu:0", "cpu:1"]
    assert [slot.visible_id for slot in slots if slot.kind == "cuda"] == ["0", "1"]


def test_a_server_started_with_visible_devices_hands_its_workers_the_same_devices() -> None:
    slots = device_slots(["cuda:0", "cuda:1"], default_cpu_slots=1, cuda_count=2, visible="2,3")
    assert DevicePool(slots).environment(slots[1:]) == {"CUDA_VISIBLE_DEVICES": "3"}


def test_listed_devices_are_the_slots_and_must_exist() -> None:
    slots = device_slots(["cuda:1", "cpu:3"], default_cpu_slots=1, cuda_count=2, visible="")
    assert [slot.name for slot in slots] == ["cuda:1", "cpu:0", "cpu:1", "cpu:2"]
    with pytest.raises(ValueError, match=r"lists cuda:2, but this machine has 2 CUDA device"):
        device_slots(["cuda:2"], default_cpu_slots=1, cuda_count=2, visible="")
    with pytest.raises(ValueError, match="set one or the other"):
        device_slots(["cuda:0"], default_cpu_slots=1, simulated_cuda=2, cuda_count=0)


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        ("auto", ["auto"]),
        ("cpu:2", ["cpu:2"]),
        ("cuda:0, CUDA:1,cpu:1", ["cuda:0", "cuda:1", "cpu:1"]),
        (["cuda:0", "cuda:1"], ["cuda:0", "cuda:1"]),
    ],
)
def test_the_setting_takes_a_list_or_comma_separated_entries(
    tmp_path: Path, value: str | list[str], entries: list[str]
) -> None:
    assert Settings(data_dir=tmp_path, devices=value).devices == entries


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("gpu:0", "devices entry 'gpu:0' is not valid: devices takes auto, or entries cpu:N"),
        ("cpu:0", "'cpu:0' is not valid"),
        ("cpu:1,cpu:2", "more than one cpu:N entry"),
        ("cuda:0,cuda:0", "lists an entry twice"),
    ],
)
def test_a_wrong_setting_says_what_it_takes(tmp_path: Path, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        Settings(data_dir=tmp_path, devices=value)


def test_the_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINBUS_DEVICES", "cpu:3")
    assert Settings().devices == ["cpu:3"]
    monkeypatch.setenv("TRAINBUS_DEVICES", '["cuda:1", "cpu:1"]')
    assert Settings().devices == ["cuda:1", "cpu:1"]


def _pool(cuda: int = 2, cpu: int = 2, *, simulated: bool = False) -> DevicePool:
    slots = [DeviceSlot("cuda", i, str(i), simulated=simulated) for i in range(cuda)]
    return DevicePool([*slots, *(DeviceSlot("cpu", i) for i in range(cpu))], cores=8)


def test_what_a_spec_asks_for() -> None:
    gpus, cpus = _pool(), _pool(cuda=0)
    assert gpus.request_of(_spec()).describe() == "1 cuda device"
    assert cpus.request_of(_spec()).describe() == "1 cpu slot"
    assert gpus.request_of(_spec(device="cpu", devices=2)).describe() == "2 cpu slots"
    assert gpus.request_of(_spec(device="cuda:1")).describe() == "cuda:1"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": 3}, "asks for 3 cuda devices, but this server has 2 in all (cuda:0, cuda:1"),
        ({"device": "cpu", "devices": 5}, "ask for at most 2"),
        ({"device": "cuda:2"}, "asks for cuda:2, but this server lends cuda:0, cuda:1, cpu:2"),
        ({"device": "cuda:1", "devices": 2}, "names one device, but devices is 2"),
    ],
)
def test_a_request_the_server_could_never_give_is_refused(
    fields: dict[str, object], message: str
) -> None:
    pool = _pool()
    with pytest.raises(SpecError, match=re.escape(message)):
        pool.check(pool.request_of(_spec(**fields)))


def test_a_cpu_only_server_says_to_ask_for_the_cpu() -> None:
    pool = _pool(cuda=0)
    with pytest.raises(SpecError, match=r"has 0 in all .*or for device 'cpu'"):
        pool.check(pool.request_of(_spec(device="cuda")))


def test_slots_are_held_released_and_named_in_what_a_job_waits_for() -> None:
    pool = _pool()
    one = pool.request_of(_spec())
    first = pool.available(one)
    assert first is not None
    pool.hold("run-a", "job-a", first)
    second = pool.available(one)
    assert second is not None and second != first
    pool.hold("run-b", "job-b", second)
    assert pool.available(one) is None
    assert pool.shortage(one) == (
        "1 cuda device (0 free of 2; cuda:0 held by job-a, cuda:1 held by job-b)"
    )
    assert pool.held_by_job("job-b") == second
    pool.release("run-a")
    assert pool.available(one) == first and pool.shortage(one) is None
    pinned = pool.request_of(_spec(device="cuda:1"))
    assert pool.available(pinned) is None  # job-b holds it
    assert pool.shortage(pinned) == "cuda:1 (1 free of 2; cuda:1 held by job-b)"


def test_the_worker_sees_its_devices_and_its_share_of_the_cores() -> None:
    pool = _pool(cuda=2, cpu=4)
    cuda = pool.available(pool.request_of(_spec()))
    cpu = pool.available(pool.request_of(_spec(device="cpu", devices=2)))
    assert cuda is not None and cpu is not None
    assert pool.environment(cuda) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert pool.environment(cpu) == {"CUDA_VISIBLE_DEVICES": ""}  # it cannot take a GPU
    assert pool.worker_spec(_spec(device="cuda:1"), cuda)["device"] == "cuda"
    placed = pool.worker_spec(_spec(device="cpu", devices=2), cpu)
    assert placed["device"] == "cpu" and placed["torch_threads"] == 4  # 2 of 4 slots, 8 cores
    assert pool.worker_spec(_spec(torch_threads=3), cuda)["torch_threads"] == 3
    assert pool.worker_spec(_spec(), cuda)["torch_threads"] == 4  # 8 cores over 2 GPUs


def test_a_simulated_cuda_slot_trains_on_the_cpu() -> None:
    pool = _pool(simulated=True)
    slots = pool.available(pool.request_of(_spec()))
    assert slots is not None
    assert pool.environment(slots) == {"CUDA_VISIBLE_DEVICES": "0"}
    assert pool.worker_spec(_spec(), slots)["device"] == "cpu"


def test_a_spec_without_a_device_runs_as_it_is() -> None:
    pool = _pool()
    program = {"program": {"name": "loop", "params": {}}}
    slots = pool.available(pool.request_of(program))
    assert slots is not None and slots[0].kind == "cuda"
    assert pool.worker_spec(program, slots) == program
