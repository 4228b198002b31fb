"""EarlyStopping: stop training when a validation metric stops improving."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kiln.callbacks.base import Callback
from kiln.engine.control import StopRequest

if TYPE_CHECKING:
    from kiln.engine.control import RunView

__all__ = ["EarlyStopping"]

log = logging.getLogger("kiln")


class EarlyStopping(Callback):
    """Requests a stop after `patience` validations in a row without improvement.

    A validation improves when its `metric` beats the best value so far by more than
    `min_delta` (mode min: value < best - min_delta; max: value > best + min_delta); the first
    validation that has the metric sets the best. Validations without the metric (e.g. a
    generation metric on a step without generation eval) neither improve nor count. So with
    the best at validation k, training stops at validation k + patience, unless one of them
    improves. The stop ends training normally: the stop step is the last one (its checkpoint
    is written, with `checkpoint.every_steps`), and final/ is written (the best checkpoint's
    weights with `checkpoint.final: best`). Its state travels with checkpoints, so a resumed
    run stops where an uninterrupted one would.
    """

    state_key = "early_stopping"

    def __init__(
        self, metric: str = "val_loss", mode: str = "min", patience: int = 3, min_delta: float = 0.0
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        if min_delta < 0:
            raise ValueError(f"min_delta must be >= 0, got {min_delta}")
        self.metric, self.mode, self.patience, self.min_delta = metric, mode, patience, min_delta
        self.load_state_dict({})

    def on_train_begin(self, run: RunView) -> None:
        if run.resumed_from is None:  # a new run (a resumed one has its state from the checkpoint)
            self.load_state_dict({})

    def improved(self, value: float) -> bool:
        """Whether `value` beats the best so far by more than `min_delta`."""
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None:
            return
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, run.state.step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience and self.stopped_step is None:
            self.stopped_step = run.state.step
            reason = (
                f"early stopping: {self.metric} did not improve by more than {self.min_delta} "
                f"for {self.patience} validations (best {self.best:.6g} at step {self.best_step})"
            )
            log.info(reason)
            run.control.request_stop(StopRequest("early_stop", reason))

    def state_dict(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped_step": self.stopped_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step")
        self.bad_evals = int(state.get("bad_evals", 0))
        self.stopped_step = state.get("stopped_step")
