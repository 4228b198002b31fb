"""Experiment trackers behind one `Logger` protocol: TensorBoard, Weights & Biases, MLflow.

metrics.jsonl (always on) is written by the run directory itself; the trackers named in
`log.loggers` receive the same records through `TrackingCallback`. Each backend module imports
its library lazily, so a missing extra matters only when that backend is selected.
"""

from kiln.callbacks.loggers.base import Logger, RunContext, flatten, metric_items
from kiln.callbacks.loggers.callback import (
    TRACKING_FILE,
    TrackingCallback,
    check_installed,
    is_main_process,
    open_logger,
    tracking_callbacks,
)

__all__ = [
    "TRACKING_FILE",
    "Logger",
    "RunContext",
    "TrackingCallback",
    "check_installed",
    "flatten",
    "is_main_process",
    "metric_items",
    "open_logger",
    "tracking_callbacks",
]
