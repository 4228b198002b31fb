"""The callbacks a run config asks for (progress, loggers, notifiers, early stopping, ...)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.callbacks.base import Callback
from kiln.callbacks.early_stop import early_stopping_from_config
from kiln.callbacks.loggers import tracking_callbacks
from kiln.callbacks.progress import ProgressCallback

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = ["default_callbacks"]


def default_callbacks(cfg: RunConfig) -> list[Callback]:
    """Callbacks built from `cfg`, in firing order.

    The trainer adds each one unless the caller passed a callback of the same class. Each
    integration builds its own (and returns nothing when the config leaves it off); optional
    extras are imported by the callback itself, so a missing extra fails only when asked for.
    """
    callbacks: list[Callback] = []
    callbacks.append(ProgressCallback(cfg.log.progress))
    callbacks += early_stopping_from_config(cfg)
    callbacks += tracking_callbacks(cfg)
    if cfg.export.on_finish:
        from kiln.callbacks.export import ExportOnFinish

        callbacks.append(ExportOnFinish(cfg.export))
    return callbacks
