"""The loop's state in one place: `TrainState` (the counters callbacks read) inside `LoopState`
(everything else a step depends on: losses not yet logged, histories, the pending validation).

Only the engine mutates it; callbacks read `TrainState` through a read-only view. One
`LoopState.state_dict()` is what a checkpoint stores for the loop.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

__all__ = ["LoopState", "TrainState"]


@dataclass
class TrainState:
    """Where training is. The data cursor is (epoch, cursor): a global sample index into the
    epoch's permutation, which is a pure function of (seed, epoch), so a resume skips in O(1).

    step / total_steps: optimizer steps done / this run will take. epoch: the current pass
    over the training data (0-based); cursor: samples of its permutation consumed (all ranks).
    micro_step: forward/backward passes done. tokens_seen / samples_seen: input tokens and
    sequences trained on (this rank's). best_metric / best_step: the best value of the tracked
    validation metric and where it was reached. last_train_loss: the train loss of the last
    logging step; last_val: the metrics of the last validation.
    """

    step: int = 0
    total_steps: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    epoch: int = 0
    cursor: int = 0
    last_train_loss: float | None = None
    micro_step: int = 0
    tokens_seen: int = 0
    samples_seen: int = 0
    last_val: dict[str, float] = field(default_factory=dict)

    def state_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy of the state."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output (keys this version no longer has are ignored)."""
        known = {f.name for f in fields(self)}
        for key, value in state.items():
            if key in known:
                setattr(self, key, value)


@dataclass
class LoopState:
    """All the loop carries from step to step (besides model, optimizer and RNG states)."""

    state: TrainState = field(default_factory=TrainState)
    pending_losses: list[torch.Tensor] = field(default_factory=list)
    """Window losses (device scalars) since the last logging step: read in one host sync."""
    pending_norms: list[torch.Tensor] = field(default_factory=list)
    """Gradient norms since the last logging step."""
    loss_history: list[float] = field(default_factory=list)
    """Train loss of every optimizer step (index i is step i + 1)."""
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per validation: step plus the val metrics."""
    validation_pending: bool = False
    """A stop interrupted this step's validation before the checkpoint: it runs on resume."""
    best_due: bool = False
    """The metric improved at this step: its checkpoint is a `best` one."""
    lr: float = 0.0
    """The learning rate of the last step."""
    epoch_started: bool = False
    epochs_ended: int = 0
    """Epochs the current step's batches finished (EPOCH_END fires after the step)."""

    def record_validation(self, metrics: dict[str, float], metric: str, mode: str) -> bool:
        """A completed validation's `metrics` (non-empty): the state's last_val, a history row,
        and the best `metric` so far (`mode` min or max); True when this one is the best (a
        NaN never is)."""
        state = self.state
        state.last_val = metrics
        self.history.append({"step": state.step, **metrics})
        value = metrics.get(metric)
        if value is None or not math.isfinite(value):
            return False
        best = state.best_metric
        if best is None or (value < best if mode == "min" else value > best):
            state.best_metric, state.best_step = value, state.step
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint stores for the loop (pending tensors read here: one host sync)."""
        return {
            "state": self.state.state_dict(),
            "pending_losses": _floats(self.pending_losses),
            "pending_norms": _floats(self.pending_norms),
            "loss_history": list(self.loss_history),
            "history": list(self.history),
            "validation_pending": self.validation_pending,
        }

    def load_state_dict(self, saved: dict[str, Any], device: torch.device) -> None:
        self.state.load_state_dict(saved["state"])
        self.pending_losses = [torch.tensor(x, device=device) for x in saved["pending_losses"]]
        self.pending_norms = [torch.tensor(x, device=device) for x in saved["pending_norms"]]
        self.loss_history = list(saved["loss_history"])
        self.history = list(saved["history"])
        self.validation_pending = bool(saved["validation_pending"])


def _floats(tensors: list[torch.Tensor]) -> list[float]:
    return torch.stack(tensors).tolist() if tensors else []
