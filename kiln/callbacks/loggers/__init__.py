"""Experiment trackers behind one `Logger` protocol: TensorBoard, Weights & Biases, MLflow, and
any tracker registered in `LOGGERS`.

metrics.jsonl (always on) is written by the run directory itself; the trackers named in
`log.loggers` receive the same records through `TrackingCallback`. Each backend module imports
its library lazily, so a missing extra matters only when that backend is selected.
"""

from kiln.callbacks.loggers.base import (
    LOGGERS,
    Logger,
    LoggerFactory,
    RunContext,
    Status,
    check_installed,
    flatten,
    metric_items,
    open_logger,
)
from kiln.callbacks.loggers.callback import TRACKING_FILE, TrackingCallback, tracking_callbacks

__all__ = [
    "LOGGERS",
    "TRACKING_FILE",
    "Logger",
    "LoggerFactory",
    "RunContext",
    "Status",
    "TrackingCallback",
    "check_installed",
    "flatten",
    "metric_items",
    "open_logger",
    "tracking_callbacks",
]
