"""The experiment-tracker plug-in point: the `Logger` protocol and what every backend shares.

metrics.jsonl is the always-on record (written by `kiln.engine.rundir.RunDir`); trackers
receive the same records, named `<split>/<metric>` (see `metric_items`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "ArtifactKind",
    "Logger",
    "RunContext",
    "Status",
    "flatten",
    "metric_items",
]

ArtifactKind = Literal["plot", "model", "file"]
"""plot: a PNG; model: the final/ directory; file: another file of the run (summary.json)."""

Status = Literal["finished", "failed", "paused"]
"""How a run ended: finished (incl. early stop), failed (raised), paused (resumable stop)."""


@dataclass(frozen=True)
class RunContext:
    """What a backend needs to open its run."""

    run_dir: Path
    name: str
    step: int
    """The step training starts from (0, or the checkpoint step on resume)."""
    resumed: bool
    run_ids: dict[str, str] = field(default_factory=dict)
    """Backend run ids stored in <run_dir>/tracking.json by an earlier part of this run."""


@runtime_checkable
class Logger(Protocol):
    """An experiment tracker. Calls come from one background thread, in order; any of them may
    raise, which switches the backend off for the rest of the run (training goes on)."""

    name: str
    run_id: str | None
    """The backend's id of this run (stored so a resumed run continues it), or None."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The resolved config, flattened to dotted keys."""

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Scalars of one metrics.jsonl record, named by `metric_items`."""

    def log_artifact(self, path: Path, kind: ArtifactKind) -> None:
        """A plot, the final model directory or another file (ignored where unsupported)."""

    def close(self, status: Status) -> None:
        """Flush and end the run."""


def metric_items(record: Mapping[str, Any]) -> dict[str, float]:
    """The tracker scalars of one metrics.jsonl record.

    Every numeric field except `step` becomes `<split>/<field>`; in val records a `val_` prefix
    is dropped (`val_ppl` -> `val/ppl`; `loss` and `val_loss` both give `val/loss`, the same
    value). Non-finite values are kept (trackers draw gaps); strings and bools are skipped.
    """
    split = str(record.get("split", "train"))
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("step", "split") or isinstance(value, bool):
            continue
        if not isinstance(value, int | float):
            continue
        if split == "val":
            key = key.removeprefix("val_")
        out[f"{split}/{key}"] = float(value)
    return out


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as dotted keys; lists and None become strings (trackers' params are
    scalars)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, list | tuple):
            out[name] = str(value) if value is not None else "null"
        elif isinstance(value, float) and not math.isfinite(value):
            out[name] = str(value)
        else:
            out[name] = value
    return out
