"""The trainbus worker: job specs, model and dataset registries, the Trainer and the job
manager. It publishes to the bus and obeys its control channels; it never imports a concrete
subscriber (the API hands them in through ``JobManager(subscriber_factory=...)``)."""

from __future__ import annotations

from ._datasets import DatasetSplit as DatasetSplit
from ._datasets import resolve_dataset_file as resolve_dataset_file
from ._datasets import split_and_standardise as split_and_standardise
from ._devices import DevicePool as DevicePool
from ._devices import DeviceSlot as DeviceSlot
from ._devices import device_slots as device_slots
from ._distributed import run_node_agent as run_node_agent
from ._errors import DatasetError as DatasetError
from ._errors import IllegalTransition as IllegalTransition
from ._errors import JobError as JobError
from ._errors import JobNotFound as JobNotFound
from ._errors import KeyConflict as KeyConflict
from ._errors import ManagerClosed as ManagerClosed
from ._errors import SpecError as SpecError
from ._inference import ReadyModel as ReadyModel
from ._inference import load_model as load_model
from ._link import Replaced as Replaced
from ._link import WorkerLink as WorkerLink
from ._manager import JobHandle as JobHandle
from ._manager import JobManager as JobManager
from ._processes import DEFAULT_PRELOAD as DEFAULT_PRELOAD
from ._processes import WorkerProcesses as WorkerProcesses
from ._program_process import LOG_FILE_NAME as PROGRAM_LOG_FILE_NAME
from ._program_spec import JobRequest as JobRequest
from ._program_spec import ProgramCall as ProgramCall
from ._program_spec import ProgramSpec as ProgramSpec
from ._program_spec import is_program_spec as is_program_spec
from ._program_spec import parse_job_spec as parse_job_spec
from ._records import JobFailure as JobFailure
from ._records import JobRecord as JobRecord
from ._registry import DatasetEntry as DatasetEntry
from ._registry import ModelEntry as ModelEntry
from ._registry import ProgramEntry as ProgramEntry
from ._registry import Registry as Registry
from ._registry import default_registry as default_registry
from ._run_spec import RunRequest as RunRequest
from ._run_spec import RunSpec as RunSpec
from ._spec import CheckpointSpec as CheckpointSpec
from ._spec import DatasetSpec as DatasetSpec
from ._spec import EarlyStopSpec as EarlyStopSpec
from ._spec import JobSpec as JobSpec
from ._spec import LRPlateauSpec as LRPlateauSpec
from ._spec import ModelSpec as ModelSpec
from ._spec import OptimizerSpec as OptimizerSpec
from ._spec import ResourcesSpec as ResourcesSpec
from ._spec import SchedulerSpec as SchedulerSpec
from ._supervisor import WorkerSupervisor as WorkerSupervisor
from ._trainer import Outcome as Outcome
from ._trainer import RunResult as RunResult
from ._trainer import Trainer as Trainer

__all__ = [
    "DEFAULT_PRELOAD",
    "PROGRAM_LOG_FILE_NAME",
    "CheckpointSpec",
    "DatasetEntry",
    "DatasetError",
    "DatasetSpec",
    "DatasetSplit",
    "DevicePool",
    "DeviceSlot",
    "EarlyStopSpec",
    "IllegalTransition",
    "JobError",
    "JobFailure",
    "JobHandle",
    "JobManager",
    "JobNotFound",
    "JobRecord",
    "JobRequest",
    "JobSpec",
    "KeyConflict",
    "LRPlateauSpec",
    "ManagerClosed",
    "ModelEntry",
    "ModelSpec",
    "OptimizerSpec",
    "Outcome",
    "ProgramCall",
    "ProgramEntry",
    "ProgramSpec",
    "ReadyModel",
    "Registry",
    "Replaced",
    "ResourcesSpec",
    "RunRequest",
    "RunResult",
    "RunSpec",
    "SchedulerSpec",
    "SpecError",
    "Trainer",
    "WorkerLink",
    "WorkerProcesses",
    "WorkerSupervisor",
    "default_registry",
    "device_slots",
    "is_program_spec",
    "load_model",
    "parse_job_spec",
    "resolve_dataset_file",
    "run_node_agent",
    "split_and_standardise",
]
