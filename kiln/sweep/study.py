"""A sweep file read and checked (`load_sweep`), and its Optuna study: distributions,
sampler, pruner and storage."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from kiln.config import ConfigError, RunConfig, load_config
from kiln.config.base import SECTION_PATHS, format_errors, short_repr
from kiln.config.run import PREFERENCE_VAL_METRICS
from kiln.config.sweep import PrunerConfig, SweepConfig, space_key
from kiln.config.yamlio import read_yaml_file
from kiln.errors import KilnError, first_line
from kiln.preflight import config_problems
from kiln.registry import require_extra

__all__ = [
    "JOURNAL",
    "SURPLUS",
    "Sweep",
    "load_sweep",
    "logged_metrics",
    "metric_problem",
    "open_study",
    "sweep_from_dict",
]

SECTION_PATHS.update({SweepConfig: "sweep", PrunerConfig: "sweep.pruner"})
JOURNAL = "study.journal"
SURPLUS = "surplus"
"""A trial asked for when another controller had just taken the last one: failed at once,
left out of trials.csv and the counts (trial numbers are handed out in order, so these come
after the sweep's own)."""


def _optuna() -> Any:
    optuna = require_extra("optuna", "sweep", feature="kiln sweep")
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
        raise ConfigError(
            [
                "sweep: required section is missing (a sweep file is a run config "
                "plus a sweep: section)"
            ],
            source,
        )
    try:
        spec = SweepConfig.model_validate(sweep_raw)
    except ValidationError as err:
        raise ConfigError(format_errors(err, "sweep"), source) from None
    problems = []
    if spec.method == "cmaes" and importlib.util.find_spec("cmaes") is None:
        # Optuna's CmaEsSampler imports it at the first candidate, in a worker thread.
        problems.append("sweep.method: cmaes needs the cmaes package (pip install cmaes)")
    sections = {k.rpartition(".")[0] for k in all_keys()}
    for key in spec.space:
        if key not in all_keys() or key in sections:
            near = closest_key(key, leaves_only=True)
            hint = f"; did you mean {near}?" if near else ""
            problems.append(f"sweep.space.{space_key(key)}: not a config key{hint}")
    if problems:
        raise ConfigError(problems, source)
    base = load_config(data=raw)  # the base alone must be a whole run
    problem = metric_problem(spec.metric, base)
    # What the base names (data files, model directory, extras), before the first trial.
    problems = ([problem] if problem else []) + config_problems(base)
    if problems:
        raise ConfigError(problems, source)
    where = base.run_dir if directory is None else Path(directory)
    return Sweep(dir=where, base=raw, spec=spec, name=base.name, source=source)


VAL_METRICS = ("val_loss", "val_ppl", "val_accuracy", "val_tokens")
"""What every validation logs (`kiln.engine.evaluate`); the other `val_*` keys come from
generation eval."""
GENERATION_SCORES = {
    "bleu": ("bleu",),
    "rouge": ("rouge1", "rouge2", "rougeL"),
    "recipe": (
        "recipe_format",
        "recipe_completeness",
        "recipe_ingredients",
        "recipe_instructions",
        "recipe_overall",
    ),
}
"""The scores of each built-in generation metric (logged as `val_<score>`): the controller
never imports torch, so it cannot ask `kiln.metrics` (a test checks the two agree)."""
_GENERATION_BOOKKEEPING = ("val_gen_samples", "val_gen_time_s")


def logged_metrics(cfg: RunConfig) -> tuple[list[str], bool]:
    """The validation metrics a run of `cfg` logs, and whether that list is open (a metric
    named by import path, whose scores only its run knows)."""
    if cfg.task == "preference":
        return list(PREFERENCE_VAL_METRICS), False
    names = list(VAL_METRICS)
    gen = cfg.eval.generate
    if gen.num_samples == 0:
        return names, False
    names += _GENERATION_BOOKKEEPING
    open_ended = False
    for metric in gen.metrics:
        scores = GENERATION_SCORES.get(metric)
        open_ended = open_ended or scores is None
        names += [f"val_{score}" for score in scores or ()]
    return names, open_ended


def metric_problem(metric: str, cfg: RunConfig) -> str | None:
    """Why `sweep.metric` cannot rank the trials of `cfg` (a name no validation logs, or no
    validation at all), or None: a typo would otherwise prune every healthy trial."""
    import difflib

    if cfg.data.val is None and cfg.data.val_split == 0:
        return (
            "sweep.metric: the trials never validate; set data.val or data.val_split > 0 "
            f"for {short_repr(metric)}"
        )
    names, open_ended = logged_metrics(cfg)
    if metric in names or (open_ended and metric.startswith("val_")):
        return None
    near = difflib.get_close_matches(metric, names, 1, cutoff=0.6)
    hint = f"did you mean {near[0]}? " if near else ""
    return (
        f"sweep.metric: {short_repr(metric)} is not a metric the trials log; {hint}"
        f"(they log {', '.join(names)})"
    )


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
    """The sweep's sampler. A grid hands point N to trial N (the same shuffle, from the seed,
    in every process); the others draw trial N's candidate from (seed, N)."""
    optuna = _optuna()
    from kiln.sweep.samplers import ControllerGrid, PerTrialSeed

    if spec.method == "cmaes":  # kiln marks diverged trials infeasible; CMA-ES has no use for it
        warnings.filterwarnings("ignore", "Constraints have been set, but CmaEs", UserWarning)
    if spec.method == "grid":
        return ControllerGrid({k: spec.values(k) for k in spec.space}, seed=spec.seed)
    make = {
        "random": optuna.samplers.RandomSampler,
        "tpe": optuna.samplers.TPESampler,
        "gp": optuna.samplers.GPSampler,
        "cmaes": optuna.samplers.CmaEsSampler,
    }[spec.method]
    return PerTrialSeed(lambda seed: make(seed=seed), spec.seed)


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
    the sweep directory's journal.

    Raises:
        KilnError: a journal file that cannot be opened (one line naming it).
    """
    optuna = _optuna()
    if url is not None and "://" in url:
        return url
    from optuna.storages.journal import JournalFileBackend

    if url is None:
        if sweep_dir is None:
            raise KilnError("--storage: name the study's storage (a URL or a journal file)")
        url = str(sweep_dir / JOURNAL)
    try:
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(url))
    except OSError as exc:
        raise KilnError(f"{url}: cannot open the sweep's journal ({first_line(exc)})") from None


def storage_name(url: str | None, sweep_dir: Path) -> str:
    """How a message names a storage: `--storage URL` (its password hidden), or the journal."""
    if url is None:
        return str(sweep_dir / JOURNAL)
    return "--storage " + re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def _permanent(exc: BaseException, *, server: bool = True) -> bool:
    """Whether opening a storage failed for good (no driver, a bad URL, a file that cannot be
    opened, and with `server` no server), rather than in a race with another controller
    creating its tables."""
    if isinstance(exc, ImportError | OSError | KilnError):
        return True
    if any(c.__name__ == "ArgumentError" for c in type(exc).__mro__):  # SQLAlchemy: bad URL
        return True
    if not server:
        return False
    text = str(exc).lower()
    return any(w in text for w in ("connection", "unable to open", "authentication"))


def open_study(sweep: Sweep, storage: str | None = None) -> Any:
    """The sweep's Optuna study (created on first use; the controller creates it before any
    worker starts, so workers on a fresh SQLite file never race to create it).

    Raises:
        KilnError: a storage that cannot be opened, in one line (no driver, an unknown scheme,
            no server, a file that cannot be written).
    """
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
        except KilnError:
            raise
        except Exception as exc:  # another controller created the tables or study meanwhile
            if storage is not None and attempt < 4 and not _permanent(exc):
                time.sleep(0.5 * (attempt + 1))
                continue
            raise storage_error(exc, storage, sweep.dir) from None
    raise AssertionError("unreachable")


def storage_error(exc: BaseException, url: str | None, sweep_dir: Path) -> KilnError:
    """The one line that says why the study's storage cannot be used."""
    where = storage_name(url, sweep_dir)
    if isinstance(exc, ImportError):
        cause = exc.__cause__ or exc
        return KilnError(
            f"{where}: its database driver is not installed ({first_line(cause)}); for "
            "PostgreSQL: pip install 'kiln[postgres]'"
        )
    return KilnError(f"{where}: cannot open the study ({first_line(exc)})")


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

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        lock = open(f"{path}.lock", "a")  # noqa: SIM115 (closed below)
    except OSError as exc:
        raise KilnError(
            f"--storage {storage}: cannot write beside it ({first_line(exc)})"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
