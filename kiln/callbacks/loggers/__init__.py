"""Experiment trackers behind one `Logger` protocol: TensorBoard, Weights & Biases, MLflow, and
any tracker registered in `LOGGERS`.

metrics.jsonl (always on) is written by the run directory itself; the trackers named in
`log.loggers` receive the same records through `TrackingCallback`. Each backend module imports
its library lazily, so a missing extra matters only when that backend is selected.
"""

from kiln.callbacks.loggers import base as _base
from kiln.callbacks.loggers.base import *  # noqa: F403  (exactly kiln.callbacks.loggers.base.__all__)
from kiln.callbacks.loggers.callback import TRACKING_FILE, TrackingCallback

__all__ = [*_base.__all__, "TRACKING_FILE", "TrackingCallback"]
