"""A sweep file read and checked (`load_sweep`), and its Optuna study: distributions,
sampler, pruner and storage."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.config import ConfigError, RunConfig, load_config
from kiln.config.base import SECTION_PATHS
from kiln.config.sweep import PrunerConfig, SweepConfig
from kiln.config.yamlio import read_yaml_file
from kiln.errors import KilnError

__all__ = ["JOURNAL", "SURPLUS", "Sweep", "load_sweep", "open_study", "sweep_from_dict"]

SECTION_PATHS.update({SweepConfig: "sweep", PrunerConfig: "sweep.pruner"})
JOURNAL = "study.journal"
SURPLUS = "surplus"
"""A trial asked for when another controller had just taken the last one: failed at once,
left out of trials.csv and the counts (trial numbers are handed out in order, so these come
after the sweep's own)."""


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise KilnError("kiln sweep needs Optuna: pip install 'kiln[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


@dataclass
class Sweep:
    """A sweep file, resolved: where it runs, the base run config and what to search."""

    dir: Path
    base: dict[str, Any]
    """The raw run config every trial starts from (overrides applied, no sweep section)."""
    spec: SweepConfig
    name: str
    source: str
    mlflow_parent: str | None = None
    """The sweep's MLflow parent run (`kiln.sweep.tracking`), once a controller made it."""

    @property
    def trials_dir(self) -> Path:
        return self.dir / "trials"

    def trial_dir(self, number: int) -> Path:
        return self.trials_dir / f"{number:04d}"

    def overrides(self, params: dict[str, Any]) -> list[str]:
        """`key=value` overrides of a trial (JSON values read back as YAML)."""
        return [f"{key}={json.dumps(value)}" for key, value in params.items()]

    def check(self, params: dict[str, Any]) -> RunConfig:
        """The trial's config, validated as `kiln train` would (ConfigError otherwise)."""
        return load_config(data=self.base, overrides=[*self.overrides(params), *self.grouping()])

    def resolved(self) -> dict[str, Any]:
        """The sweep as one dict: the base run config plus its `sweep:` section."""
        return {**self.base, "sweep": self.spec.model_dump(mode="json")}

    def grouping(self) -> list[str]:
        """What makes trials parts of one sweep: no notifications of their own (the sweep
        sends them), a W&B group named after the sweep unless the config names one, and in
        MLflow one store (`mlflow_store`) and the sweep's parent run to nest under."""
        out = []
        if (self.base.get("notify") or {}).get("senders"):
            out.append("notify.senders=[]")
        log_section = self.base.get("log") or {}
        loggers = log_section.get("loggers") or []
        grouped = (log_section.get("wandb") or {}).get("group")
        if "wandb" in loggers and not grouped:
            out.append(f"log.wandb.group={json.dumps(self.name)}")
        if "mlflow" in loggers and self.mlflow_store is not None:
            out.append(f"log.mlflow.tracking_uri={json.dumps(self.mlflow_store)}")
        if "mlflow" in loggers and self.mlflow_parent is not None:
            out.append(f"log.mlflow.parent_run_id={json.dumps(self.mlflow_parent)}")
        return out

    @property
    def mlflow_store(self) -> str | None:
        """One SQLite store in the sweep directory for the trials' MLflow runs, when neither
        the config nor $MLFLOW_TRACKING_URI names one (each run would have its own)."""
        opts = (self.base.get("log") or {}).get("mlflow") or {}
        if opts.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"):
            return None
        return f"sqlite:///{self.dir.resolve()}/mlflow.db"


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and check a sweep file; `overrides` (`key=value`, `sweep.*` for the sweep section)
    apply first. Every space key must be a config key and the base config must be valid.

    Raises:
        ConfigError: one line per problem, naming the key (before any trial runs).
    """
    from kiln.config.run import apply_overrides

    raw = read_yaml_file(Path(path))
    return sweep_from_dict(apply_overrides(raw, list(overrides or [])), str(path))


def sweep_from_dict(raw: dict[str, Any], source: str, directory: Path | None = None) -> Sweep:
    """A sweep from its resolved dict (a run config plus `sweep:`), checked as `load_sweep`
    says; `directory` replaces where it runs (the base config's run directory)."""
    from kiln.config.suggest import all_keys, closest_key

    raw = dict(raw)
    sweep_raw = raw.pop("sweep", None)
    if not isinstance(sweep_raw, dict):
        raise ConfigError(["sweep: required section is missing (a sweep file is a run config "
                           "plus a sweep: section)"], source)  # fmt: skip
    spec = SweepConfig(**sweep_raw)
    problems = []
    sections = {k.rpartition(".")[0] for k in all_keys()}
    for key in spec.space:
        if key not in all_keys() or key in sections:
            near = closest_key(key, leaves_only=True)
            hint = f"; did you mean {near}?" if near else ""
            problems.append(f"sweep.space.{key}: not a config key{hint}")
    if problems:
        raise ConfigError(problems, source)
    base = load_config(data=raw)  # the base alone must be a whole run
    where = base.run_dir if directory is None else Path(directory)
    return Sweep(dir=where, base=raw, spec=spec, name=base.name, source=source)


# ---- the study -----------------------------------------------------------------------------


def _distributions(spec: SweepConfig) -> dict[str, Any]:
    optuna = _optuna()
    dists = {}
    for key in spec.space:
        values = spec.values(key)
        if isinstance(values, list):
            dists[key] = optuna.distributions.CategoricalDistribution(values)
            continue
        low, high, log = values["low"], values["high"], bool(values.get("log", False))
        step = values.get("step")
        if isinstance(low, int) and isinstance(high, int):
            dists[key] = optuna.distributions.IntDistribution(low, high, log=log, step=step or 1)
        else:
            dists[key] = optuna.distributions.FloatDistribution(low, high, log=log, step=step)
    return dists


def _sampler(spec: SweepConfig) -> Any:
    optuna = _optuna()
    seed = spec.seed
    if spec.method == "grid":
        return optuna.samplers.GridSampler({k: spec.values(k) for k in spec.space}, seed=seed)
    if spec.method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if spec.method == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if spec.method == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.CmaEsSampler(seed=seed)


def _pruner(p: PrunerConfig) -> Any:
    optuna = _optuna()
    if p.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.startup_trials)
    if p.type == "percentile":
        return optuna.pruners.PercentilePruner(p.percentile, n_startup_trials=p.startup_trials)
    if p.type == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def storage_of(url: str | None, sweep_dir: Path | None = None) -> Any:
    """An Optuna storage: a database URL as is; a path (no `://`) is a journal file; None is
    the sweep directory's journal."""
    optuna = _optuna()
    if url is not None and "://" in url:
        return url
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        if sweep_dir is None:
            raise KilnError("--storage: name the study's storage (a URL or a journal file)")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        url = str(sweep_dir / JOURNAL)
    return optuna.storages.JournalStorage(JournalFileBackend(url))


def open_study(sweep: Sweep, storage: str | None = None) -> Any:
    """The sweep's Optuna study (created on first use; the controller creates it before any
    worker starts, so workers on a fresh SQLite file never race to create it)."""
    optuna = _optuna()
    direction = "minimize" if sweep.spec.mode == "min" else "maximize"
    for attempt in range(5):
        try:
            with _creating(storage):
                return optuna.create_study(
                    study_name=sweep.name,
                    storage=storage_of(storage, sweep.dir),
                    sampler=_sampler(sweep.spec),
                    pruner=_pruner(sweep.spec.pruner),
                    direction=direction,
                    load_if_exists=True,
                )
        except Exception as exc:  # another controller created the tables or study meanwhile
            if storage is None or attempt == 4 or isinstance(exc, ImportError):
                raise
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _creating(storage: str | None) -> Iterator[None]:
    """Controllers that start together on a fresh SQLite file would each create its tables
    (and one fail on the schema version row): they take turns, under a lock file beside it."""
    path = (
        storage.removeprefix("sqlite:///") if storage and storage.startswith("sqlite:///") else None
    )
    if path is None or os.name == "nt":
        yield
        return
    import fcntl

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
