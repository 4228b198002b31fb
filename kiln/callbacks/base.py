"""Callback: one no-op method per `Event`. Callbacks observe; they change training only by
asking the trainer (`trainer.request_stop(reason)`, `trainer.request_save()`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

    from kiln.engine.trainer import Trainer

__all__ = ["Callback"]


class Callback:
    """Base class for observers of the training loop; override the events you need.

    The order in which the loop fires events is documented on `kiln.engine.events.Event`.
    `state_dict`/`load_state_dict` let a callback's own state travel with checkpoints.
    """

    def on_train_begin(self, trainer: Trainer) -> None:
        """Before the first step (after the run directory and config.yaml are written)."""

    def on_epoch_begin(self, trainer: Trainer) -> None:
        """A new pass over the training data starts (`trainer.state.epoch`)."""

    def on_step_begin(self, trainer: Trainer) -> None:
        """An optimizer step (one accumulation window) starts."""

    def on_backward_begin(self, trainer: Trainer) -> None:
        """Before `loss.backward()` of one micro-batch."""

    def on_backward_end(self, trainer: Trainer) -> None:
        """After `loss.backward()` of one micro-batch."""

    def on_optimizer_step_begin(self, trainer: Trainer) -> None:
        """Gradients are final (accumulated, unscaled, clipped); the optimizer is about to step."""

    def on_optimizer_step_end(self, trainer: Trainer) -> None:
        """The optimizer stepped and gradients were zeroed."""

    def on_step_end(self, trainer: Trainer) -> None:
        """The step is done; `trainer.state.step` counts it."""

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        """Metrics are ready: train metrics on logging steps, val metrics after validation."""

    def on_epoch_end(self, trainer: Trainer) -> None:
        """The last batch of an epoch was consumed."""

    def on_validation_begin(self, trainer: Trainer) -> None:
        """Validation is about to run."""

    def on_validation_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        """Validation finished with these metrics (`val_loss`, `val_ppl`, `val_accuracy`)."""

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        """A checkpoint or the final model was written to `path`."""

    def on_train_end(self, trainer: Trainer) -> None:
        """Training ended (normally or by a stop request); the final model is written."""

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """The loop raised `exc`; it is re-raised after the callbacks run."""

    def state_dict(self) -> dict[str, Any]:
        """State to save in checkpoints (none by default)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore state saved by `state_dict`."""
