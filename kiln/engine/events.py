"""The events the training loop fires, in order.

Where each event fires in `Trainer.fit()`::

    TRAIN_BEGIN
    for each optimizer step until max_steps / num_epochs:
        EPOCH_BEGIN                      # when a new pass over the data starts
        STEP_BEGIN
        for each micro-batch of the accumulation window:
            forward (autocast)
            BACKWARD_BEGIN
            loss.backward()
            BACKWARD_END
        unscale, clip
        OPTIMIZER_STEP_BEGIN
        optimizer.step(); zero_grad
        OPTIMIZER_STEP_END
        STEP_END                         # state.step is now the number of steps done
        LOG                              # on logging steps: train metrics (the only host sync)
        EPOCH_END                        # when this step consumed the last batch of an epoch
        VALIDATION_BEGIN                 # every eval.every_steps, and after the last step
        VALIDATION_END                   # with val metrics; then LOG with them
        CHECKPOINT                       # after a checkpoint or the final model is written
    TRAIN_END                            # also after a stop request
    EXCEPTION                            # instead of TRAIN_END when fit() raises (setup too)

Callbacks receive these as `Callback.on_<value>` calls (see `kiln.callbacks.Callback`).
"""

from __future__ import annotations

from enum import Enum

__all__ = ["Event"]


class Event(str, Enum):
    """A point in the training loop; the value names the callback method (`on_<value>`)."""

    TRAIN_BEGIN = "train_begin"
    EPOCH_BEGIN = "epoch_begin"
    STEP_BEGIN = "step_begin"
    BACKWARD_BEGIN = "backward_begin"
    BACKWARD_END = "backward_end"
    OPTIMIZER_STEP_BEGIN = "optimizer_step_begin"
    OPTIMIZER_STEP_END = "optimizer_step_end"
    STEP_END = "step_end"
    LOG = "log"
    EPOCH_END = "epoch_end"
    VALIDATION_BEGIN = "validation_begin"
    VALIDATION_END = "validation_end"
    CHECKPOINT = "checkpoint"
    TRAIN_END = "train_end"
    EXCEPTION = "exception"

    @property
    def method(self) -> str:
        """The callback method name for this event."""
        return f"on_{self.value}"
