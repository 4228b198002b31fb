"""What happens after the anomaly guard flags a step (`train.anomaly`): `Judge` records every
anomaly in anomalies.jsonl, rolls the run back to the last complete checkpoint before it, or
stops it as diverged (exit 4); and it refuses to let anything non-finite be written.

Every rank judges alike (the flags agree across ranks), so each decision is taken by all of
them at the same point, and a diverged stop is agreed at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from kiln.engine.anomaly import Verdict, finite_state
from kiln.engine.control import StopRequest
from kiln.engine.resume import restore_checkpoint

if TYPE_CHECKING:
    from kiln.checkpoint import CheckpointManager
    from kiln.config import RunConfig
    from kiln.engine.control import Control
    from kiln.engine.parts import Parts
    from kiln.engine.rundir import RunDir
    from kiln.engine.state import LoopState
    from kiln.rank import RankContext

__all__ = ["Judge"]

log = logging.getLogger("kiln")


class Judge:
    """Reviews the guard's flags for the trainer (see the module doc). `rewound` is called
    after a rollback has restored the loop state (the trainer moves its data cursor there)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        rank: RankContext,
        run_dir: RunDir,
        checkpoints: CheckpointManager,
        control: Control,
        loop: LoopState,
        callbacks: Sequence[Any],
        rewound: Callable[[], None],
    ) -> None:
        self.cfg, self.rank, self.run_dir, self.checkpoints = cfg, rank, run_dir, checkpoints
        self.control, self.loop, self.callbacks, self.rewound = control, loop, callbacks, rewound

    def review(self, parts: Parts) -> bool:
        """Judge the steps flagged since the last review: record them, then go on, roll back
        or stop as diverged. Returns whether it rolled back."""
        records, verdict = parts.guard.review(self.rank, parts.sources)
        rollback = verdict is not None and verdict.action == "rollback"
        if rollback:
            verdict = self._rollback(parts, verdict, records)  # type: ignore[arg-type]
        for record in records:
            self.run_dir.log_anomaly(record)
            log.warning("anomaly at step %(step)d: %(kind)s %(value)s (%(action)s)", record)
        if verdict is not None:
            self.diverge(verdict.reason)
        return rollback and verdict is None

    def may_write(self, parts: Parts) -> bool:
        """Review first; then whether the weights may be written now (a checkpoint, final/):
        not after a rollback or a diverged stop, nor when anything is non-finite."""
        if self.review(parts) or self.diverged:
            return False
        return finite_state(parts, self.rank, self.diverge)

    def _rollback(
        self, parts: Parts, verdict: Verdict, records: list[dict[str, Any]]
    ) -> Verdict | None:
        """Back to the last complete checkpoint before the anomaly, with the anomalous steps'
        samples left out of the rest of their epochs; a Verdict to stop when there is none."""
        before = [c.path for c in self.checkpoints.list() if c.step < verdict.step]
        if not before:
            why = f"diverged at {verdict.reason}, with no checkpoint before it to roll back to"
            return Verdict("stop", verdict.step, why)
        parts.guard.exclude(records)
        kept = parts.guard.state_dict()  # what the guard learned survives the restore
        restore_checkpoint(before[-1], parts, self.loop, self.callbacks, self.rank)
        parts.guard.load_state_dict(kept)
        step = self.loop.state.step
        self.run_dir.resume(self.cfg, step, anomalies=False)
        self.rewound()
        for record in records:
            record["to_step"] = step
        log.warning("%s: rolled back to step %d", verdict.reason, step)
        return None

    def diverge(self, reason: str) -> None:
        """Stop as diverged (exit 4): every rank has decided it alike, so they agree now."""
        self.control.request_stop(StopRequest("diverged", reason, resumable=False))
        self.control.sync(self.rank)

    @property
    def diverged(self) -> bool:
        decided = self.control.decided
        return decided is not None and decided.kind == "diverged"
