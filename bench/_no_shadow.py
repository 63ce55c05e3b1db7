"""Imported first by every benchmark script: ``bench/bus.py`` shares its name with the ``bus``
package, and a script's own folder comes first on ``sys.path``; take that folder off."""

from __future__ import annotations

import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.modules.pop("bus", None)  # in case something imported bench/bus.py as "bus" already
