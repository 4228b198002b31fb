"""The training engine: the loop, its state and its events.

Loaded lazily: `import kiln.engine.status` (or any small helper) does not load the trainer,
the data pipeline or the callbacks.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["Event", "StopRequest", "TrainResult", "TrainState", "Trainer"]

_LAZY = {
    "Event": "kiln.engine.events",
    "StopRequest": "kiln.engine.control",
    "TrainResult": "kiln.engine.trainer",
    "TrainState": "kiln.engine.state",
    "Trainer": "kiln.engine.trainer",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kiln.engine' has no attribute {name!r}")
