"""trainbus: run, watch and steer PyTorch training jobs as a service.

One distribution, one import name. The packages live at the top of the source tree, as the
design lays them out, and install under this name:

- :mod:`trainbus.bus`: events, the bus, delivery policies, control, and the shared vocabulary
- :mod:`trainbus.worker`: job specs, model and dataset registries, the trainer, the job manager
- :mod:`trainbus.subscribers`: checkpoints, controllers, Prometheus, resources, the event store,
  experiment trackers
- :mod:`trainbus.api`: the FastAPI service, the Python clients and the ``trainbus`` CLI

Importing ``trainbus`` loads none of them.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trainbus")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
