"""TrackingCallback: feeds the trackers named in `log.loggers` from the training loop.

Each backend runs on its own background thread, so a slow or unreachable tracker never blocks
a step; one that raises is switched off with one warning and training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.callbacks.base import Callback
from kiln.callbacks.loggers.base import Logger, RunContext, Status, flatten, metric_items
from kiln.callbacks.loggers.worker import Worker
from kiln.config.tracking import LogConfig
from kiln.errors import KilnError
from kiln.files import write_atomic

if TYPE_CHECKING:
    from kiln.config import RunConfig
    from kiln.engine.trainer import Trainer

__all__ = [
    "TRACKING_FILE",
    "TrackingCallback",
    "check_installed",
    "is_main_process",
    "open_logger",
    "tracking_callbacks",
]

log = logging.getLogger("kiln")

TRACKING_FILE = "tracking.json"
"""In the run directory: each backend's run id, so a resumed run continues the same run."""

_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def check_installed(names: list[str]) -> None:
    """Raise a KilnError naming the extra for each selected backend that is not installed."""
    missing = [n for n in names if importlib.util.find_spec(_MODULES[n]) is None]
    if missing:
        raise KilnError(
            [f"log.loggers: {n} is not installed: pip install 'kiln[{n}]'" for n in missing]
        )


def open_logger(name: str, cfg: LogConfig, ctx: RunContext) -> Logger:
    """Open backend `name` (tensorboard | wandb | mlflow) for the run in `ctx`."""
    if name == "tensorboard":
        from kiln.callbacks.loggers.tensorboard import TensorBoardLogger

        return TensorBoardLogger(cfg.tensorboard, ctx)
    if name == "wandb":
        from kiln.callbacks.loggers.wandb import WandbLogger

        return WandbLogger(cfg.wandb, ctx)
    if name == "mlflow":
        from kiln.callbacks.loggers.mlflow import MlflowLogger

        return MlflowLogger(cfg.mlflow, ctx)
    raise ValueError(f"unknown logger {name!r}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


class _Backend:
    """One tracker and the thread that talks to it."""

    def __init__(self, name: str, on_open: Callable[[str, str | None], None]) -> None:
        self.name = name
        self.logger: Logger | None = None
        self.failed = False
        self._on_open = on_open
        self.worker = Worker(f"kiln-{name}", on_error=self._fail)

    def _fail(self, exc: BaseException) -> None:
        if self.failed:
            return
        self.failed = True
        log.warning(
            "log.loggers: %s failed (%s); it is off for the rest of the run",
            self.name,
            _first_line(exc),
        )
        if self.logger is not None:
            with contextlib.suppress(Exception):
                self.logger.close("failed")
        self.logger = None

    def open(self, factory: Callable[[], Logger]) -> None:
        def run() -> None:
            self.logger = factory()
            self._on_open(self.name, self.logger.run_id)

        self.worker.submit(run)

    def call(self, method: str, *args: Any) -> None:
        def run() -> None:
            if self.logger is not None and not self.failed:
                getattr(self.logger, method)(*args)

        self.worker.submit(run)


class TrackingCallback(Callback):
    """Sends params, metrics and artifacts to TensorBoard, W&B and/or MLflow.

    Params: the resolved config, flattened (`optim.lr`). Metrics: every metrics.jsonl record
    (train and val) by step, named by `metric_items`. Artifacts at the end: the plots, the
    final model (its path; the files too with `log_model`) and summary.json.
    """

    def __init__(self, cfg: LogConfig) -> None:
        check_installed(list(cfg.loggers))
        self.cfg = cfg
        self._backends: list[_Backend] = []
        self._final: Path | None = None
        self._ids: dict[str, str] = {}
        self._lock = threading.Lock()
        self._run_dir: Path | None = None

    @property
    def active(self) -> list[str]:
        """Backends that have not failed."""
        return [b.name for b in self._backends if not b.failed]

    def _store_id(self, name: str, run_id: str | None) -> None:
        if run_id is None or self._run_dir is None:
            return
        with self._lock:
            self._ids[name] = run_id
            write_atomic(self._run_dir / TRACKING_FILE, json.dumps(self._ids, indent=2) + "\n")

    def on_train_begin(self, trainer: Trainer) -> None:
        if not self.cfg.loggers or not trainer.run_dir.enabled:
            return
        run_dir = self._run_dir = trainer.run_dir.path
        ids: dict[str, str] = {}
        resumed = trainer.resumed_from is not None
        if resumed and (run_dir / TRACKING_FILE).exists():
            with contextlib.suppress(ValueError, OSError):
                ids = dict(json.loads((run_dir / TRACKING_FILE).read_text()))
        self._ids = dict(ids) if resumed else {}
        ctx = RunContext(
            run_dir=run_dir,
            name=trainer.cfg.name,
            step=trainer.state.step,
            resumed=resumed,
            run_ids=ids,
        )
        params = flatten(trainer.cfg.model_dump(mode="json"))
        for name in self.cfg.loggers:
            backend = _Backend(name, self._store_id)
            backend.open(lambda name=name: open_logger(name, self.cfg, ctx))
            backend.call("log_params", params)
            self._backends.append(backend)

    def on_log(self, trainer: Trainer, metrics: dict[str, Any]) -> None:
        if not self._backends:
            return
        items = metric_items(metrics)
        step = int(metrics["step"])
        for backend in self._backends:
            backend.call("log_metrics", items, step)

    def on_checkpoint(self, trainer: Trainer, path: Path) -> None:
        if path == trainer.run_dir.path / "final":
            self._final = path

    def on_train_end(self, trainer: Trainer) -> None:
        if not self._backends:
            return
        run_dir = trainer.run_dir.path
        plots = sorted((run_dir / "plots").glob("*.png")) if self.cfg.plots else []
        for backend in self._backends:
            for png in plots:
                backend.call("log_artifact", png, "plot")
            if self._final is not None:
                backend.call("log_artifact", self._final, "model")
            if (run_dir / "summary.json").exists():
                backend.call("log_artifact", run_dir / "summary.json", "file")
        self._close("finished" if self._final is not None else "paused")

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        self._close("failed")

    def _close(self, status: Status) -> None:
        for backend in self._backends:
            backend.call("close", status)
        # Stop all first, then wait against one deadline: the trackers drain in parallel, so
        # one slow upload does not eat the time of the ones after it.
        for backend in self._backends:
            backend.worker.stop()
        deadline = time.monotonic() + self.cfg.close_timeout_s
        for backend in self._backends:
            if not backend.worker.join(max(0.0, deadline - time.monotonic())):
                log.warning(
                    "log.loggers: %s still busy after %g s (log.close_timeout_s); "
                    "not waiting for it",
                    backend.name,
                    self.cfg.close_timeout_s,
                )
        self._backends = []


def is_main_process() -> bool:
    """True outside torchrun, and on rank 0 under it: only the main process tracks and tells."""
    return os.environ.get("RANK", "0") == "0"


def tracking_callbacks(cfg: RunConfig) -> list[Callback]:
    """Plots, trackers and notifications as `cfg.log` and `cfg.notify` ask, in firing order
    (plots first, so the trackers can attach them). A selected tracker whose extra is missing
    is an error here, before any data is prepared."""
    from kiln.callbacks.notify import NotifyCallback
    from kiln.callbacks.plots import PlotsCallback

    if cfg.log.loggers:
        check_installed(list(cfg.log.loggers))
    if not is_main_process():
        return []
    callbacks: list[Callback] = []
    if cfg.log.plots:
        callbacks.append(PlotsCallback())
    if cfg.log.loggers:
        callbacks.append(TrackingCallback(cfg.log))
    if cfg.notify.senders:
        callbacks.append(NotifyCallback(cfg.notify))
    return callbacks
