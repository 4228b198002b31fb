"""The callbacks a run config asks for: the one place they are built from a config.

`kiln.job.job_callbacks` (which the Trainer's constructor calls) adds them to the callbacks a
caller gives, on the main rank only; nothing else builds a callback from a config.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.callbacks.base import Callback
from kiln.callbacks.early_stop import EarlyStopping
from kiln.callbacks.loggers.callback import TrackingCallback
from kiln.callbacks.progress import ProgressCallback

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = ["default_callbacks"]


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """Callbacks built from `cfg`, in firing order: progress, early stopping
    (`eval.early_stopping`), plots (`log.plots`; first of the three, so the trackers can attach
    them), trackers (`log.loggers`), notifications (`notify.senders`), export on finish
    (`export.on_finish`).

    The job adds each one unless the caller passed a callback of the same class. Optional extras
    are imported by the callback that needs them, so a missing extra fails only when asked for,
    and here, before any data is prepared (a selected tracker's extra is checked when built).
    """
    callbacks: list[Callback] = [ProgressCallback(cfg.log.progress)]
    es = cfg.eval.early_stopping
    if es.enabled:
        callbacks.append(EarlyStopping(es.metric, es.mode, es.patience, es.min_delta))
    if cfg.log.plots:
        from kiln.callbacks.plotting import PlotsCallback

        callbacks.append(PlotsCallback())
    if cfg.log.loggers:
        callbacks.append(TrackingCallback(cfg.log))
    if cfg.notify.senders:
        from kiln.callbacks.notify import NotifyCallback

        callbacks.append(NotifyCallback(cfg.notify))
    if cfg.export.on_finish:
        from kiln.callbacks.export import ExportOnFinish

        callbacks.append(ExportOnFinish(cfg.export))
    return callbacks
