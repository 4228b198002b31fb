"""TrainState: the loop's counters. Only the engine mutates it; callbacks read it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["TrainState"]


@dataclass
class TrainState:
    """Where training is. The data cursor is (epoch, cursor): a sample index into the epoch's
    permutation, which is a pure function of (seed, epoch), so a resume skips in O(1)."""

    step: int = 0
    """Optimizer steps done."""
    total_steps: int = 0
    """Optimizer steps this run will take."""
    epoch: int = 0
    """Current pass over the training data (0-based)."""
    cursor: int = 0
    """Samples of the current epoch's permutation already consumed."""
    micro_step: int = 0
    """Micro-batches done (forward/backward passes)."""
    tokens_seen: int = 0
    """Target tokens trained on (the loss denominator, summed)."""
    samples_seen: int = 0
    """Sequences trained on."""
    best_metric: float | None = None
    """Best value of the tracked validation metric so far."""
    best_step: int | None = None
    """Step at which `best_metric` was reached."""
    last_train_loss: float | None = None
    """Train loss at the last logging step."""
    last_val: dict[str, float] = field(default_factory=dict)
    """Metrics of the last validation."""
    stop_reason: str | None = None
    """Why training stopped early, once a stop was requested."""

    def state_dict(self) -> dict[str, Any]:
        """A JSON-friendly copy of the state."""
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from `state_dict()` output."""
        for key, value in state.items():
            setattr(self, key, value)
