"""Callback: one no-op method per `Event`. Callbacks observe the run through a read-only
`RunView`; they change training only by asking: `run.control.request_stop(StopRequest(...))`,
`run.control.request_save()`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    from kiln.engine.control import CheckpointKind, RunView

__all__ = ["Callback", "CallbackList"]


class Callback:
    """Base class for observers of the training loop; override the events you need.

    The order in which the loop fires events is documented on `kiln.engine.events.Event`.
    `state_dict`/`load_state_dict` let a callback's own state travel with checkpoints, saved
    under `state_key` (default: the class name), so adding or reordering callbacks never
    hands one callback's state to another.
    """

    state_key: ClassVar[str | None] = None
    """The stable name this callback's state is saved under (None: the class name)."""

    def on_train_begin(self, run: RunView) -> None:
        """Before the first step (after the run directory and config.yaml are written)."""

    def on_epoch_begin(self, run: RunView) -> None:
        """A new pass over the training data starts (`run.state.epoch`)."""

    def on_step_begin(self, run: RunView) -> None:
        """An optimizer step (one accumulation window) starts."""

    def on_backward_begin(self, run: RunView) -> None:
        """Before `loss.backward()` of one micro-batch."""

    def on_backward_end(self, run: RunView) -> None:
        """After `loss.backward()` of one micro-batch."""

    def on_optimizer_step_begin(self, run: RunView) -> None:
        """Gradients are final (accumulated, unscaled, clipped); the optimizer is about to step."""

    def on_optimizer_step_end(self, run: RunView) -> None:
        """The optimizer stepped and gradients were zeroed."""

    def on_step_end(self, run: RunView) -> None:
        """The step is done; `run.state.step` counts it."""

    def on_log(self, run: RunView, metrics: dict[str, Any]) -> None:
        """Metrics are ready: train metrics on logging steps, val metrics after validation."""

    def on_epoch_end(self, run: RunView) -> None:
        """The last batch of an epoch was consumed."""

    def on_validation_begin(self, run: RunView) -> None:
        """Validation is about to run."""

    def on_validation_end(self, run: RunView, metrics: dict[str, float]) -> None:
        """Validation finished with these metrics (`val_loss`, `val_ppl`, `val_accuracy`)."""

    def on_checkpoint(self, run: RunView, path: Path, kind: CheckpointKind) -> None:
        """A checkpoint (kind periodic, best or pause) or the final model (kind final) was
        written to `path`."""

    def on_train_end(self, run: RunView) -> None:
        """Training ended (normally or by a stop request: `run.stop`); the final model is
        written unless the run paused or was stopped without one."""

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        """The loop raised `exc`; it is re-raised after the callbacks run."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by `state_dict`."""


class CallbackList(list[Any]):
    """The run's callbacks, in order, with the ones each event needs called kept at hand:
    a callback that leaves an event as `Callback`'s no-op is passed over (six events a step,
    each through every callback, add up on a fast step)."""

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        super().__init__(callbacks)
        self._listening: dict[tuple[str, int], list[Any]] = {}

    def listening(self, method: str) -> list[Any]:
        """The callbacks whose `method` does something, in order (redone when one is added)."""
        key = (method, len(self))
        found = self._listening.get(key)
        if found is None:
            noop = getattr(Callback, method)
            found = self._listening[key] = [  # asked as the loop asks: a callback may answer
                cb  # for itself (`__getattr__`, an attribute set on the instance)
                for cb in self
                if getattr(getattr(cb, method, None), "__func__", None) is not noop
            ]
        return found
