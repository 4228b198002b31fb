"""TrackingCallback: feeds the trackers named in `log.loggers` from the training loop.

Each tracker runs on its own `kiln.callbacks.background.Lane`, so a slow or unreachable one
never blocks a step; one that raises is switched off with one warning and training goes on.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from kiln.callbacks.background import Lane, drain
from kiln.callbacks.base import Callback
from kiln.callbacks.loggers.base import (
    Logger,
    RunContext,
    Status,
    check_installed,
    flatten,
    metric_items,
    open_logger,
)
from kiln.config.tracking import LogConfig
from kiln.engine.status import final_state
from kiln.files import write_atomic
from kiln.runs import RunPaths

if TYPE_CHECKING:
    from kiln.engine.control import CheckpointKind, RunView

__all__ = ["TRACKING_FILE", "TrackingCallback"]

TRACKING_FILE = "tracking.json"
"""In the run directory: each backend's run id, so a resumed run continues the same run."""


class _Tracker:
    """One tracker on its own lane: the lane switches it off after its first error, closing
    its run as failed (best effort)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.logger: Logger | None = None
        self.lane = Lane("log.loggers", name, on_off=self._close_failed)

    def _close_failed(self) -> None:
        logger, self.logger = self.logger, None
        if logger is not None:
            logger.close("failed")

    def open(
        self, factory: Callable[[], Logger], on_open: Callable[[str, str | None], None]
    ) -> None:
        def run() -> None:
            self.logger = factory()
            on_open(self.name, self.logger.run_id)

        self.lane.submit(run)

    def call(self, method: str, *args: Any) -> None:
        def run() -> None:
            if self.logger is not None:
                getattr(self.logger, method)(*args)

        self.lane.submit(run)


class TrackingCallback(Callback):
    """Sends params, metrics and artifacts to TensorBoard, W&B, MLflow and registered trackers.

    Params: the resolved config, flattened (`optim.lr`). Metrics: every metrics.jsonl record
    (train and val) by step, named by `metric_items`. Artifacts at the end: the plots, the
    final model (its path; the files too with `log_model`) and summary.json. `loggers`: the
    trackers' names in `LOGGERS` (default `cfg.loggers`).
    """

    state_key = "tracking"

    def __init__(self, cfg: LogConfig, loggers: Sequence[str] | None = None) -> None:
        self.loggers = list(cfg.loggers if loggers is None else loggers)
        check_installed(self.loggers)
        self.cfg = cfg
        self._trackers: list[_Tracker] = []
        self._final: Path | None = None
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._run_dir: Path | None = None

    @property
    def active(self) -> list[str]:
        """Trackers that have not failed."""
        return [t.name for t in self._trackers if not t.lane.failed]

    def _store_id(self, name: str, run_id: str | None) -> None:
        if run_id is None or self._run_dir is None:
            return
        with self._lock:  # the trackers' threads open their runs concurrently
            self._ids[name] = run_id
            write_atomic(self._run_dir / TRACKING_FILE, json.dumps(self._ids, indent=2) + "\n")

    def on_train_begin(self, run: RunView) -> None:
        self._final = None
        if not self.loggers:
            return
        run_dir = self._run_dir = run.run_dir
        ids: dict[str, str] = {}
        resumed = run.resumed_from is not None
        if resumed and (run_dir / TRACKING_FILE).exists():
            with contextlib.suppress(ValueError, OSError):
                ids = dict(json.loads((run_dir / TRACKING_FILE).read_text()))
        self._ids = dict(ids)
        ctx = RunContext(
            run_dir=run_dir, name=run.cfg.name, step=run.state.step, resumed=resumed, run_ids=ids
        )
        params = flatten(run.cfg.model_dump(mode="json"))
        for name in self.loggers:
            tracker = _Tracker(name)
            tracker.open(lambda name=name: open_logger(name, self.cfg, ctx), self._store_id)
            tracker.call("log_params", params)
            self._trackers.append(tracker)

    def on_log(self, run: RunView, metrics: dict[str, Any]) -> None:
        if not self._trackers:
            return
        items = metric_items(metrics)
        step = int(metrics["step"])
        for tracker in self._trackers:
            tracker.call("log_metrics", items, step)

    def on_checkpoint(self, run: RunView, path: Path, kind: CheckpointKind) -> None:
        if kind == "final":
            self._final = path

    def on_train_end(self, run: RunView) -> None:
        if not self._trackers:
            return
        paths = RunPaths(run.run_dir)
        plots = sorted(paths.plots.glob("*.png")) if self.cfg.plots else []
        for tracker in self._trackers:
            for png in plots:
                tracker.call("log_artifact", png, "plot")
            if self._final is not None:
                tracker.call("log_artifact", self._final, "model")
            if paths.summary.exists():
                tracker.call("log_artifact", paths.summary, "file")
        # As status.json says: finished, paused, stopped (e.g. pruned) or diverged.
        self._close(cast(Status, final_state(run.stop)[0]))

    def on_exception(self, run: RunView, exc: BaseException) -> None:
        self._close("failed")

    def _close(self, status: Status) -> None:
        for tracker in self._trackers:
            tracker.call("close", status)
        drain([t.lane for t in self._trackers], self.cfg.close_timeout_s, "log.close_timeout_s")
        self._trackers = []
