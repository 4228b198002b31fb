"""Keeps this rank's `Whereabouts` (kiln.rank) at the loop's position, so a collective that
times out, or a peer that dies, is reported with the step and micro-step each rank was at.
Added on every rank of a job of several (`kiln.job`); it only observes."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from kiln.callbacks.base import Callback

if TYPE_CHECKING:
    from kiln.engine.control import RunView

__all__ = ["RankWhereabouts"]


class RankWhereabouts(Callback):
    """Sets `run.rank.where.step / micro_step`: 1-based, of the step and micro-batch being
    trained, or of the last ones trained between steps (after a resume: the checkpoint's)."""

    state_key: ClassVar[str | None] = "rank_whereabouts"

    def on_train_begin(self, run: RunView) -> None:
        run.rank.where.step, run.rank.where.micro_step = run.state.step, run.state.micro_step

    def on_step_begin(self, run: RunView) -> None:
        where = run.rank.where
        where.step, where.micro_step = run.state.step + 1, run.state.micro_step + 1

    def on_backward_begin(self, run: RunView) -> None:
        run.rank.where.micro_step = run.state.micro_step + 1  # counts passes done before it

    def on_step_end(self, run: RunView) -> None:
        run.rank.where.step, run.rank.where.micro_step = run.state.step, run.state.micro_step
