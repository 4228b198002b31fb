"""What callbacks see and how they steer: a read-only `RunView` and a `Control`.

Callbacks never receive the Trainer. Every callback method gets the view (config, state, run
directory, model, latest metrics, the stop requested so far); `run.control` takes requests:
`request_stop(StopRequest(...))` and `request_save()`. The loop acts on them at the next step
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.engine.state import TrainState
    from kiln.rank import RankContext

__all__ = ["CheckpointKind", "Control", "RunView", "StopKind", "StopRequest"]

StopKind = Literal["requested", "early_stop", "signal", "pruned", "diverged"]
CheckpointKind = Literal["periodic", "best", "pause", "final"]
"""Why a checkpoint (or final/) was written: the CHECKPOINT event carries it."""


@dataclass(frozen=True)
class StopRequest:
    """A typed request to end training early.

    kind: requested (user code), early_stop (the metric stopped improving), signal (SIGTERM /
    SIGINT), pruned (a sweep gave up on the run), diverged (non-finite or exploding loss).
    resumable: write a checkpoint to continue from, and no final validation; the run exits as
    paused. write_final: run the final validation and write final/ (ignored when resumable).
    """

    kind: StopKind
    reason: str
    resumable: bool = False
    write_final: bool = True

    @property
    def ends_run(self) -> bool:
        """The run is over (finished early) rather than paused or cut short without a model.
        A diverged run never ends with a final model (its weights may be non-finite)."""
        return not self.resumable and self.write_final and self.kind != "diverged"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "reason": self.reason}


class Control:
    """Requests from callbacks (and signals) to the loop; the first stop request wins."""

    def __init__(self) -> None:
        self.stop: StopRequest | None = None
        self.save_requested = False
        self._agreed: StopRequest | None = None
        self._synced = False
        self._closed = False

    def close(self) -> None:
        """The loop is over: later stop requests (a signal while final/ is written) change
        nothing, so a run that trained to its end is reported as finished."""
        self._closed = True

    def request_stop(self, request: StopRequest) -> None:
        """Stop after the current step (a resumable request also turns an earlier one into a
        pause: a checkpoint is always written when anyone asks to resume later)."""
        if not isinstance(request, StopRequest):
            raise TypeError(f"request_stop takes a StopRequest, got {type(request).__name__}")
        if not self._closed:
            self.stop = _merge(self.stop, request)

    def request_save(self) -> None:
        """Write a checkpoint at the next step boundary."""
        self.save_requested = True

    def sync(self, rank: RankContext, counts: tuple[int, ...] = ()) -> tuple[int, ...]:
        """Agree with every rank (a collective; nothing at world size 1): the first stop
        request by rank order (made resumable if any rank asked to resume), a save if any rank
        asked for one. Returns `counts` summed over the ranks."""
        if not rank.distributed:
            return counts
        sent = self.stop
        gathered = rank.all_gather((sent, self.save_requested, counts), "step agreement")
        # A request made while gathering (a signal) is not in `gathered`: it goes to the next.
        late = self.stop if self.stop is not sent else None
        agreed = None
        for stop, _, _ in gathered:
            agreed = _merge(agreed, stop)
        self.save_requested = any(save for _, save, _ in gathered)
        self._agreed, self._synced = agreed, True
        self.stop = _merge(agreed, late)
        return tuple(sum(c) for c in zip(*(c for _, _, c in gathered), strict=True))

    @property
    def decided(self) -> StopRequest | None:
        """The stop every rank acts on: the request itself in one process; on N ranks the one
        agreed at the last `sync` (a request made since waits for the next)."""
        return self._agreed if self._synced else self.stop

    @property
    def stopping(self) -> bool:
        return self.decided is not None


def _merge(first: StopRequest | None, then: StopRequest | None) -> StopRequest | None:
    """The first request wins; a later resumable one makes it a pause."""
    if first is None or then is None:
        return first or then
    if then.resumable and not first.resumable:
        return StopRequest(first.kind, first.reason, resumable=True)
    return first


class _ReadOnly:
    """Attribute access to an object, without assignment."""

    __slots__ = ("_target",)

    def __init__(self, target: Any) -> None:
        object.__setattr__(self, "_target", target)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"read-only: callbacks request changes through run.control ({name})")

    def __repr__(self) -> str:
        return f"ReadOnly({self._target!r})"


class RunView:
    """What a callback may read about the run (and `control`, where it may ask for things).

    cfg, state (read-only), run_dir, rank, metrics (the latest record written to
    metrics.jsonl), throughput, resumed_from, stop (the stop requested so far); model,
    tokenizer and device
    once the run is built (None before: an EXCEPTION during setup).
    """

    def __init__(
        self, cfg: RunConfig, state: TrainState, run_dir: Path, control: Control, rank: RankContext
    ) -> None:
        self.cfg = cfg
        self.state: TrainState = _ReadOnly(state)  # type: ignore[assignment]
        self.run_dir = run_dir
        self.control = control
        self.rank = rank
        self.metrics: dict[str, Any] = {}
        """The latest record written to metrics.jsonl."""
        self.throughput: dict[str, float] = {}
        """Speed at the latest logged train step (tokens_per_s, samples_per_s over the steps
        since the previous log line, loss_avg, peak_mem_mb, mfu where known, elapsed_s)."""
        self.resumed_from: Path | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.device: Any = None

    def bind(self, parts: Any) -> None:
        """The run is built: its model, tokenizer and device."""
        self.model, self.tokenizer, self.device = parts.model, parts.tokenizer, parts.device

    @property
    def stop(self) -> StopRequest | None:
        """The stop requested so far, if any."""
        return self.control.stop
