"""The run directory's layout, its states and the exit codes they end with: the names every
other module takes from here (through `kiln.runs`, the public face of this package), so no
other module spells `"metrics.jsonl"` or `"step-"`. Standard library only.
"""

from __future__ import annotations

import enum
import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "ACTIVE_STATES",
    "ANOMALIES",
    "CHECKPOINTS",
    "CONFIG",
    "DATA_STATS",
    "END_STATES",
    "EVAL",
    "EXPORT",
    "FINAL",
    "FINAL_CONFIG",
    "MANIFEST",
    "METRICS",
    "PLOTS",
    "REPORT",
    "RUN_ARTIFACTS",
    "SAMPLES",
    "STATES",
    "STATE_EXIT_CODES",
    "STATUS",
    "STEP_PREFIX",
    "SUMMARY",
    "TRAIN_LOG",
    "ExitCode",
    "RunPaths",
    "checkpoint_name",
    "held_run",
    "held_run_refusal",
    "not_a_directory",
    "run_dir_of",
    "step_of",
]

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
STATUS = "status.json"
SUMMARY = "summary.json"
DATA_STATS = "data_stats.json"
ANOMALIES = "anomalies.jsonl"
REPORT = "report.md"
CHECKPOINTS = "checkpoints"
FINAL = "final"
PLOTS = "plots"
SAMPLES = "samples"
EVAL = "eval"
EXPORT = "export"
TRAIN_LOG = "train.log"
FINAL_CONFIG = "kiln_config.yaml"
"""The config inside final/ (a model directory carries its run's config under this name)."""
MANIFEST = "manifest.json"
"""Inside a checkpoint directory, written last (see `kiln.checkpoint`)."""
STEP_PREFIX = "step-"
"""checkpoints/step-<N>/ and samples/step-<N>.jsonl: `checkpoint_name`."""

RUN_ARTIFACTS = (
    CONFIG,
    METRICS,
    ANOMALIES,
    STATUS,
    SUMMARY,
    DATA_STATS,
    TRAIN_LOG,
    FINAL,
    CHECKPOINTS,
    PLOTS,
    SAMPLES,
    EVAL,  # `kiln eval RUN_DIR` reports
    EXPORT,  # `kiln export` / export.on_finish, and the report of a failed parity check:
    f"{EXPORT}.export_report.json",
    REPORT,
    "tracking.json",  # trackers' run ids, and their local stores:
    "tensorboard",
    "wandb",
    "mlflow.db",
    "mlflow-artifacts",
)
"""What kiln writes in a run directory (the engine, and the commands that add to a run: eval,
export, plot, report); `--overwrite` removes exactly these and nothing else of the user's."""
# Artifacts that alone do not make a run: status.json is what a run refused during setup
# leaves, and a console log without the rest is a log kept, not a run to protect.
_NOT_A_RUN = (STATUS, TRAIN_LOG)


class ExitCode(enum.IntEnum):
    """The exit codes of `kiln train` (and of the other commands: `kiln sweep` pauses with 3,
    every command answers bad input with 2). The one definition: the CLI, the engine's
    status.json, sweeps, the server and the docs take them from here."""

    FINISHED = 0
    """Finished: final/ written (early stopping included)."""
    FAILED = 1
    """An error that is not bad input (a bug, a crash): the traceback is printed."""
    BAD_INPUT = 2
    """Bad config, data, arguments or files: one line naming the key path or file:line."""
    PAUSED = 3
    """Stopped with a checkpoint (SIGTERM, Ctrl-C, a sweep pausing or pruning it): resumable."""
    DIVERGED = 4
    """The loss or gradients diverged (train.anomaly: stop), or a check of it failed."""
    STORAGE_FULL = 5
    """The disk filled up while writing (`kiln.files.StorageFull`): resumable once freed."""
    ABORTED = 130
    """A second Ctrl-C: aborted at once (checkpoints already written stay). A signal before
    training started, with nothing to resume, exits 128 + its number (143 for SIGTERM)."""


STATES = ("starting", "running", "paused", "finished", "failed", "diverged", "stopped")
"""The `state` values of status.json (format 1); `run_state` adds "lost"."""
ACTIVE_STATES = ("starting", "running")
"""States of a run whose process is still expected to be alive."""
END_STATES = ("paused", "finished", "failed", "diverged", "stopped")
"""States a run writes when it ends (the process is gone, or going)."""
STATE_EXIT_CODES: dict[str, ExitCode] = {
    "finished": ExitCode.FINISHED,
    "paused": ExitCode.PAUSED,  # resumable stop (a signal, a sweep's pause)
    "stopped": ExitCode.PAUSED,  # ended without final/ (a sweep pruned it): resumable too
    "diverged": ExitCode.DIVERGED,
    "failed": ExitCode.FAILED,  # or the error's own: BAD_INPUT, STORAGE_FULL, ABORTED, 128+sig
}
"""End state -> the exit code a run in it ends with: the one table (status.json's exit_code,
the CLI's, a sweep's and the server's reading of a code). A failed run's code depends on its
error (`kiln.engine.status.exit_code_for`); the table gives the generic one."""

_STEP_DIR = re.compile(re.escape(STEP_PREFIX) + r"(\d+)")


@dataclass(frozen=True)
class RunPaths:
    """Where each file of the run directory `root` lives: `RunPaths(run_dir).metrics`, ..."""

    root: Path

    def __init__(self, root: str | os.PathLike[str]) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def status(self) -> Path:
        return self.root / STATUS

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY

    @property
    def data_stats(self) -> Path:
        return self.root / DATA_STATS

    @property
    def anomalies(self) -> Path:
        return self.root / ANOMALIES

    @property
    def report(self) -> Path:
        return self.root / REPORT

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def final(self) -> Path:
        return self.root / FINAL

    @property
    def plots(self) -> Path:
        return self.root / PLOTS

    @property
    def samples(self) -> Path:
        return self.root / SAMPLES

    @property
    def eval(self) -> Path:
        return self.root / EVAL

    @property
    def export(self) -> Path:
        return self.root / EXPORT

    @property
    def train_log(self) -> Path:
        return self.root / TRAIN_LOG

    def checkpoint(self, step: int) -> Path:
        """checkpoints/step-<step> (complete or not, existing or not)."""
        return self.checkpoints / checkpoint_name(step)

    def samples_at(self, step: int) -> Path:
        """samples/step-<step>.jsonl: the generation-eval samples of one validation."""
        return self.samples / f"{checkpoint_name(step)}.jsonl"

    def is_run(self) -> bool:
        """Whether `root` holds a run: config.yaml or status.json, and it is not a checkpoint
        (which holds a config.yaml too, and a manifest.json)."""
        has_run_file = self.config.is_file() or self.status.is_file()
        return has_run_file and not (self.root / MANIFEST).exists()


def checkpoint_name(step: int) -> str:
    """step-<step>: the name of a checkpoint directory (and of a validation's samples file)."""
    return f"{STEP_PREFIX}{step}"


def step_of(path: str | os.PathLike[str]) -> int | None:
    """N of a checkpoint directory named step-<N>, else None."""
    m = _STEP_DIR.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def run_dir_of(path: str | os.PathLike[str]) -> Path | None:
    """The run directory `path` belongs to: itself (a run), its parent (final/) or its
    grandparent (checkpoints/step-N); None for anything else (a plain model directory)."""
    path = Path(path)
    if path.name == FINAL:
        return path.parent
    if path.parent.name == CHECKPOINTS:
        return path.parent.parent
    return path if RunPaths(path).is_run() else None


def not_a_directory(path: str | os.PathLike[str]) -> str | None:
    """The one line refusing `path` as a run directory when it, or the nearest of its parents
    that exists, is not a directory (the directory cannot be made there); None: it can be."""
    path = Path(path)
    where = next((p for p in (path, *path.parents) if p.exists()), None)
    if where is not None and not where.is_dir():
        return f"output_dir: {where} is a file, not a directory"
    return None


def held_run(root: str | os.PathLike[str]) -> tuple[list[str], list[str]]:
    """(the `RUN_ARTIFACTS` present in `root`, a dangling symbolic link included; those of
    them that make it hold a run, which a new run may replace only with `--overwrite`)."""
    root = Path(root)
    existing = [name for name in RUN_ARTIFACTS if _present(root / name)]
    return existing, [name for name in existing if name not in _NOT_A_RUN]


def held_run_refusal(root: str | os.PathLike[str], held: list[str], why: str = "") -> str:
    """The one line refusing to start a run in `root`, which holds the run artifacts `held`
    (`why`: what the run was asked to do, appended)."""
    return (
        f"output_dir: {root} already holds a run ({', '.join(held)}){why}; "
        "pass --overwrite (overwrite=True) or choose another name/output_dir"
    )


def _present(path: Path) -> bool:
    """Whether `path` exists, a dangling symbolic link included."""
    return path.is_symlink() or path.exists()
