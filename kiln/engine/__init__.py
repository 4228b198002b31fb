"""The training engine: the loop, its state and its events.

Loaded lazily: `import kiln.engine.status` (or any small helper) does not load the trainer,
the data pipeline or the callbacks.
"""

from __future__ import annotations

from kiln.registry import lazy_exports

__all__ = ["Event", "StopRequest", "TrainResult", "TrainState", "Trainer"]

_LAZY = {
    "Event": "kiln.engine.events",
    "StopRequest": "kiln.engine.control",
    "TrainResult": "kiln.engine.trainer",
    "TrainState": "kiln.engine.state",
    "Trainer": "kiln.engine.trainer",
}


__getattr__ = lazy_exports(__name__, _LAZY)
