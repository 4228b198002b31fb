"""PlotsCallback: PNG curves in <run_dir>/plots at the end of a run (`log.plots`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from kiln.callbacks.base import Callback
from kiln.registry import MissingExtra, require_extra

if TYPE_CHECKING:
    from kiln.engine.control import RunView

__all__ = ["PlotsCallback"]

log = logging.getLogger("kiln")


class PlotsCallback(Callback):
    """Draws loss, LR and eval-metric curves from metrics.jsonl when training ends (also when
    it pauses). Fires before the trackers' end of run, so they can attach the PNGs. A failure
    to plot is a warning, never a failed run."""

    def on_train_end(self, run: RunView) -> None:
        try:
            require_extra("matplotlib", "plots", feature="log.plots")
        except MissingExtra as exc:
            log.warning("%s; no plots drawn", exc)
            return
        from kiln.plots import plot_run

        try:
            plot_run(run.run_dir)
        except Exception as exc:
            log.warning("log.plots: could not draw the plots (%s: %s)", type(exc).__name__, exc)
