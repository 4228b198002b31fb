"""When validation and checkpoints fall due: by step, by epoch, and (checkpoints) by time.

Steps and epochs are the same on every rank. Time is not: only the main rank reads its clock,
and its wish to save travels with the once-a-step agreement (`Control.sync`) as a save
request, so every rank saves at the same step. Saving reads no RNG, so a run with time-based
checkpoints trains exactly as one without them.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.config import RunConfig

__all__ = ["Cadence"]


class Cadence:
    """The validation and checkpoint cadence of a run (`eval.every_steps`/`every_epochs`,
    `checkpoint.every_steps`/`every_epochs`/`every_minutes`)."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self._since: float | None = None  # the clock at the last checkpoint (or the start)

    def _epochs_due(self, every: int | None, epoch: int, ended: int) -> bool:
        """Whether one of the `ended` epochs that ended at this step (the last of them is
        epoch number `epoch`, counting from 1) is a multiple of `every`."""
        return every is not None and any(
            n % every == 0 for n in range(epoch - ended + 1, epoch + 1)
        )

    def eval_due(self, step: int, epoch: int, ended: int) -> bool:
        """Validation at `step` (besides the last, which the loop adds): every_steps, or an
        epoch end on every_epochs."""
        every = self.cfg.eval.every_steps
        by_step = every is not None and step % every == 0
        return by_step or self._epochs_due(self.cfg.eval.every_epochs, epoch, ended)

    def checkpoint_due(self, step: int, epoch: int, ended: int, last: bool) -> bool:
        """A periodic checkpoint at `step`: every_steps (and then the last step too), or an
        epoch end on every_epochs. Time is asked separately (`minutes_due`)."""
        every = self.cfg.checkpoint.every_steps
        by_step = every is not None and (step % every == 0 or last)
        return by_step or self._epochs_due(self.cfg.checkpoint.every_epochs, epoch, ended)

    def minutes_due(self) -> bool:
        """`checkpoint.every_minutes` of training have passed since the last checkpoint (or
        since the run started or resumed)."""
        minutes = self.cfg.checkpoint.every_minutes
        now = monotonic()
        if self._since is None:
            self._since = now
        return minutes is not None and now - self._since >= 60.0 * minutes

    def reset(self) -> None:
        """The run started or resumed, or a checkpoint (of any kind) was written: the time
        cadence counts from here."""
        self._since = monotonic()
