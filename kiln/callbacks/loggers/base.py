"""The experiment-tracker plug-in point: the `Logger` protocol, the `LOGGERS` registry and what
every backend shares.

metrics.jsonl is the always-on record (written by `kiln.engine.rundir.RunDir`); trackers
receive the same records, named `<split>/<metric>` (see `metric_items`). A tracker of your own
is a class registered by name (its constructor is the factory)::

    @LOGGERS.register("mine")
    class MyLogger:
        name = "mine"
        def __init__(self, cfg: LogConfig, ctx: RunContext) -> None: ...
        # run_id, log_params, log_metrics, log_artifact, close: see `Logger`

and named in `TrackingCallback(cfg.log, loggers=["tensorboard", "mine"])`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from kiln.config.tracking import LogConfig
from kiln.errors import KilnError
from kiln.registry import Registry, UnknownName, missing_extra, require_extra

__all__ = [
    "LOGGERS",
    "ArtifactKind",
    "Logger",
    "LoggerFactory",
    "RunContext",
    "Status",
    "check_installed",
    "flatten",
    "metric_items",
    "open_logger",
]

ArtifactKind = Literal["plot", "model", "file"]
"""plot: a PNG; model: the final/ directory; file: another file of the run (summary.json)."""

Status = Literal["finished", "failed", "paused", "stopped", "diverged"]
"""How a run ended (as in status.json): finished (incl. early stop), failed (raised), paused
(resumable stop), stopped (ended without a final model, e.g. pruned), diverged."""


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
            if key == "epoch":  # train/epoch has it already
                continue
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


LoggerFactory = Callable[[LogConfig, RunContext], Logger]
"""Opens a tracker's run (on the tracker's own thread): a `Logger` class whose constructor
takes (the `log` config, the run context) is one."""

LOGGERS: Registry[LoggerFactory] = Registry("logger")
"""Trackers by name (`kiln.registry.Registry`): tensorboard, wandb, mlflow and yours."""


@dataclass(frozen=True)
class _Builtin:
    """A tracker shipped with kiln, imported only when opened. `name` is also its options
    section of `LogConfig`, its pip extra and the package it needs."""

    name: str
    target: str
    """"module:Class" of the `Logger`, constructed with (options, run context)."""

    def __call__(self, cfg: LogConfig, ctx: RunContext) -> Logger:
        require_extra(self.name, self.name, feature=f"log.loggers: {self.name}")
        module, _, attr = self.target.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        return cls(getattr(cfg, self.name), ctx)

    def missing(self) -> str | None:
        """The one-line error for a missing extra (`require_extra`'s), found without importing
        the package (mlflow and wandb take seconds to import); None when it is installed.
        `kiln.preflight` asks the same before anything heavy loads."""
        return missing_extra(self.name, self.name, feature=f"log.loggers: {self.name}")


LOGGERS.add(
    "tensorboard", _Builtin("tensorboard", "kiln.callbacks.loggers.tensorboard:TensorBoardLogger")
)
LOGGERS.add("wandb", _Builtin("wandb", "kiln.callbacks.loggers.wandb:WandbLogger"))
LOGGERS.add("mlflow", _Builtin("mlflow", "kiln.callbacks.loggers.mlflow:MlflowLogger"))


def check_installed(names: Sequence[str]) -> None:
    """Check, before any work, that each tracker in `names` can be opened.

    Raises:
        KilnError: one line per name that no tracker is registered under (the registry's
            message, with the known names) and per built-in whose extra is not installed
            (naming `pip install 'kiln[<extra>]'`).
    """
    problems: list[str] = []
    for name in names:
        try:
            factory = LOGGERS.get(name)
        except UnknownName as exc:
            problems.append(f"log.loggers: {exc}")
            continue
        missing = factory.missing() if isinstance(factory, _Builtin) else None
        if missing is not None:
            problems.append(missing)
    if problems:
        raise KilnError(problems)


def open_logger(name: str, cfg: LogConfig, ctx: RunContext) -> Logger:
    """Open tracker `name` (a registered name or "module:attribute") for the run in `ctx`.

    Raises:
        UnknownName (a KeyError): no tracker is registered as `name`.
        MissingExtra: a built-in tracker's extra is not installed.
    """
    return LOGGERS.get(name)(cfg, ctx)
