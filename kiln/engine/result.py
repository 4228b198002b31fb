"""What `Trainer.fit()` returns: the run's outcome, and its metrics as a table."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kiln.engine.control import StopRequest
from kiln.runs import RunPaths

__all__ = ["THROUGHPUT_KEYS", "TrainResult"]

THROUGHPUT_KEYS = ("tokens_per_s", "samples_per_s", "loss_avg", "peak_mem_mb", "mfu", "elapsed_s")
"""The speed figures of a train record: rates over the steps since the previous log line,
loss_avg over the last 100 steps (of the whole run: it goes on across a resume, and steps
undone by a rollback leave it), elapsed_s since this process's part of the run started (the
run's start, or its resume)."""


@dataclass
class TrainResult:
    """What `Trainer.fit()` returns."""

    run_dir: Path
    loss_history: list[float]
    """Train loss of every optimizer step (index i is step i + 1)."""
    metrics: list[dict[str, float]]
    """One row per validation: step plus val_loss, val_ppl, val_accuracy (and generation
    metrics). `table()` has every logged metric, train rows too."""
    best_step: int | None
    best_metric: float | None
    final_dir: Path | None
    checkpoint_paths: list[Path] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    sample: str | None = None
    status: str = "finished"
    """finished | paused | stopped | diverged (as in status.json)."""
    stop: StopRequest | None = None
    """Why training ended before its last step, if it did."""

    def records(self) -> list[dict[str, Any]]:
        """Every record of metrics.jsonl (the run's own log; a resumed run's has the steps
        before the resume too), in order, each with step, epoch and split."""
        path = RunPaths(self.run_dir).metrics
        lines = path.read_text().splitlines() if path.is_file() else []
        rows, epoch = [], 0
        for line in lines:
            record = json.loads(line)
            # Validation rows take the epoch of the training step they follow.
            epoch = record.get("epoch", epoch)
            rows.append({"step": record["step"], "epoch": epoch, "split": record["split"]})
            rows[-1].update((k, v) for k, v in record.items() if k not in rows[-1])
        return rows

    def table(self, *, as_records: bool = False) -> Any:
        """The metrics as a table: one row per logged train step and per validation, columns
        step, epoch (the data cursor's pass after that step, from 0: the step that completes
        the first pass shows 1, as in metrics.jsonl), split ("train" or "val") and
        every metric (a metric a row lacks is missing: NaN in pandas, absent in a record).
        A pandas DataFrame when pandas is installed (unless `as_records`), else `records()`."""
        rows = self.records()
        if as_records:
            return rows
        try:
            import pandas as pd
        except ImportError:
            return rows
        return pd.DataFrame.from_records(rows)

    @property
    def best_epoch(self) -> int | None:
        """The epoch of `best_step`, as `table()` counts it (1 when the best validation came
        at the end of the first pass)."""
        if self.best_step is None:
            return None
        at = [r["epoch"] for r in self.records() if r["step"] <= self.best_step]
        return at[-1] if at else 0

    @property
    def throughput(self) -> dict[str, float]:
        """Speed over this process's part of the run (tokens_per_s, samples_per_s,
        wall_time_s, peak_memory_mb, mfu where known; a resumed run: since the resume, as in
        summary.json), and over the last logged steps (`last_` + THROUGHPUT_KEYS)."""
        keys = ("tokens_per_s", "samples_per_s", "wall_time_s", "peak_memory_mb", "mfu")
        out = {k: self.summary[k] for k in keys if self.summary.get(k) is not None}
        train = [r for r in self.records() if r["split"] == "train"]
        if train:
            out.update((f"last_{k}", train[-1][k]) for k in THROUGHPUT_KEYS if k in train[-1])
        return out
