"""trainbus subscribers: checkpoints, early stopping, LR plateau, Prometheus, resources, store,
experiment trackers.

Per job: :class:`CheckpointWriter`, :class:`EarlyStopController`, :class:`LRPlateauController`,
and the trackers :class:`TensorBoardExporter`, :class:`MLflowExporter`, :class:`WandbExporter`
(each tracker's package is an optional extra, imported only when its exporter writes).
One per server: :class:`PrometheusExporter`, :class:`ResourceMonitor`, :class:`EventStore`.
``subscribers`` imports only ``bus`` of the project; it sees trainers through
:class:`TrainerLike`.
"""

from __future__ import annotations

from ._checkpoint_files import clean_orphans as clean_orphans
from ._checkpoint_layout import CheckpointInfo as CheckpointInfo
from ._checkpoint_layout import checkpoint_path as checkpoint_path
from ._checkpoint_layout import list_checkpoints as list_checkpoints
from ._checkpoint_loading import adopt_newest_checkpoint as adopt_newest_checkpoint
from ._checkpoint_loading import latest_valid_state as latest_valid_state
from ._checkpoint_loading import load_checkpoint as load_checkpoint
from ._checkpoint_loading import verify_checkpoint as verify_checkpoint
from ._checkpoint_writer import CheckpointWriter as CheckpointWriter
from ._checkpoint_writer import CheckpointWriterStatistics as CheckpointWriterStatistics
from ._early_stop import EarlyStopController as EarlyStopController
from ._early_stop import EarlyStopDecision as EarlyStopDecision
from ._early_stop import EarlyStopping as EarlyStopping
from ._early_stop import EarlyStopReason as EarlyStopReason
from ._errors import CheckpointCorrupt as CheckpointCorrupt
from ._errors import CheckpointError as CheckpointError
from ._errors import CheckpointNotFound as CheckpointNotFound
from ._errors import SubscribersError as SubscribersError
from ._errors import UnsafeCheckpoint as UnsafeCheckpoint
from ._lr_plateau import LRPlateau as LRPlateau
from ._lr_plateau import LRPlateauController as LRPlateauController
from ._mlflow import MLflowExporter as MLflowExporter
from ._prometheus import PrometheusExporter as PrometheusExporter
from ._resources import ResourceMonitor as ResourceMonitor
from ._store import EventStore as EventStore
from ._tensorboard import TensorBoardExporter as TensorBoardExporter
from ._trackers import TRACKER_EXTRAS as TRACKER_EXTRAS
from ._trackers import TrackerStatistics as TrackerStatistics
from ._trackers import TrackerSubscriber as TrackerSubscriber
from ._trackers import missing_tracker_package as missing_tracker_package
from ._trainer import TrainerLike as TrainerLike
from ._wandb import WandbExporter as WandbExporter

__all__ = [
    "TRACKER_EXTRAS",
    "CheckpointCorrupt",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointNotFound",
    "CheckpointWriter",
    "CheckpointWriterStatistics",
    "EarlyStopController",
    "EarlyStopDecision",
    "EarlyStopReason",
    "EarlyStopping",
    "EventStore",
    "LRPlateau",
    "LRPlateauController",
    "MLflowExporter",
    "PrometheusExporter",
    "ResourceMonitor",
    "SubscribersError",
    "TensorBoardExporter",
    "TrackerStatistics",
    "TrackerSubscriber",
    "TrainerLike",
    "UnsafeCheckpoint",
    "WandbExporter",
    "adopt_newest_checkpoint",
    "checkpoint_path",
    "clean_orphans",
    "latest_valid_state",
    "list_checkpoints",
    "load_checkpoint",
    "missing_tracker_package",
    "verify_checkpoint",
]
