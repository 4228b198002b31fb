"""The run directory from the outside: its layout (the one place that knows it) and readers for
everything that drives runs without a live Trainer (sweeps, the REST server, a dashboard,
`kiln report`, `kiln eval`). The engine writes the directory; these functions only read it.

    runs/<name>/
      config.yaml              the resolved config, exactly what ran
      metrics.jsonl            one JSON record per line ({"step", "split", "loss", ...}),
                               appended and flushed a line at a time; a value that is not
                               a finite number (a diverging loss) is null
      status.json              what the run is doing now (rewritten atomically; `read_status`)
      summary.json             steps, tokens, timings, best and final metrics (at the end)
      data_stats.json          row, example and token counts of the data
      anomalies.jsonl          one JSON record per detected anomaly (`read_anomalies`),
                               appended and flushed like metrics.jsonl
      checkpoints/step-<N>/    manifest.json written last: complete only with a valid manifest
      final/                   the model and tokenizer, with kiln_config.yaml
      plots/ samples/ eval/    PNG curves, generated samples per step, `kiln eval` reports
      export/                  `kiln export` (and export.on_finish): the ONNX/TorchScript bundle
      report.md                `kiln report`
      train.log                what `kiln train` printed (its main rank), appended on resume

Light to import (no torch, no transformers, no kiln.engine): a server can poll many runs from
a small process. Typical use, tailing a live run:

    tail = MetricsTail(run_dir)
    while run_state(read_status(run_dir)) in ACTIVE_STATES:
        new, rewritten = tail.read()   # rewritten: a resume or rollback cut the history back;
        ...                            # tail.records is the whole current history

How a run ends (status.json's state, `kiln train`'s exit code): `STATE_EXIT_CODES`, `ExitCode`.
"""

from __future__ import annotations

import enum
import json
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kiln.errors import KilnError, first_line

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
    "SAMPLES",
    "STALE_AFTER_S",
    "STATES",
    "STATE_EXIT_CODES",
    "STATUS",
    "STEP_PREFIX",
    "SUMMARY",
    "TRAIN_LOG",
    "CheckpointEntry",
    "ExitCode",
    "MetricsTail",
    "RunInfo",
    "RunPaths",
    "checkpoint_name",
    "config_file",
    "is_alive",
    "list_checkpoints",
    "list_runs",
    "pid_running",
    "read_anomalies",
    "read_config_raw",
    "read_metrics",
    "read_status",
    "read_summary",
    "run_dir_of",
    "run_state",
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
STALE_AFTER_S = 1800.0
"""Default heartbeat age after which a run on another host counts as lost. The engine rewrites
status.json at the start, at every log step and after each validation, so the gap can be long
(data preparation, a slow validation): pick a value above the longest one."""

_STEP_DIR = re.compile(re.escape(STEP_PREFIX) + r"(\d+)")
_STATUS_KEYS = (
    "format",
    "state",
    "pid",
    "host",
    "kiln_version",
    "started_at",
    "heartbeat",
    "step",
    "total_steps",
    "epoch",
    "tokens",
    "train",
    "val",
    "eta_s",
    "stop",
    "exit_code",
    "error",
    "run_dir",
)


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


# ---- status ----------------------------------------------------------------------------------


def _nonfinite(name: str) -> None:
    """How the readers take a bare NaN, Infinity or -Infinity (not JSON, but what the files of
    older runs may hold): as null, what kiln writes for them now."""
    return None


def _read_json(path: Path, *, strict: bool) -> dict[str, Any] | None:
    """The JSON object in `path`; None when absent or not an object. Unreadable or invalid
    JSON: KilnError naming the file when `strict`, else None."""
    try:
        data = json.loads(path.read_bytes(), parse_constant=_nonfinite)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        if strict:
            raise KilnError(f"{path}: cannot read ({first_line(exc)})") from None
        return None
    return data if isinstance(data, dict) else None


def read_status(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """status.json of a run, or None when there is none (not started, or a run from before
    status.json) or it is not a JSON object (the engine writes it atomically: never torn).

    Every key of format 1 is present (None where the file lacks it): format, state (one of
    `STATES`), pid, host, kiln_version, started_at and heartbeat (unix seconds), step,
    total_steps, epoch, tokens, train and val (the latest records), eta_s, stop ({kind,
    reason} or None), exit_code, error (the error's first line when failed), run_dir. A newer
    format's extra keys are kept. The state may be out of date: see `run_state`.
    """
    data = _read_json(RunPaths(run_dir).status, strict=False)
    if data is None:
        return None
    for key in _STATUS_KEYS:
        data.setdefault(key, None)
    return data


def pid_running(pid: int) -> bool:
    """Whether process `pid` exists on this host (a zombie, exited but not reaped, does not)."""
    if os.name == "nt":  # os.kill would terminate it; assume alive (the heartbeat decides)
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, owned by another user
        return True
    try:  # Linux: a zombie still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rpartition(")")[2].split()[:1] != ["Z"]


def run_state(
    status: dict[str, Any] | None,
    *,
    now: float | None = None,
    stale_after_s: float | None = STALE_AFTER_S,
) -> str:
    """The state of a run from its status: status["state"], or "lost" when that says the run
    is active (starting or running) but its process is gone; "unknown" without a status.

    Lost means, on the host that wrote the status (status["host"] is this machine's name): its
    pid is no longer running, or is a zombie (the heartbeat is not consulted: a live process
    may go long without one). On another host, or without a pid: its heartbeat is older than
    `stale_after_s` seconds (None: never lost). A run killed with SIGKILL, or whose machine
    died, ends up lost; one that ended in any other way wrote its final state itself.
    """
    if status is None:
        return "unknown"
    state = str(status.get("state") or "unknown")
    if state not in ACTIVE_STATES:
        return state
    pid, host = status.get("pid"), status.get("host")
    if isinstance(pid, int) and pid > 0 and host == socket.gethostname():
        return state if pid_running(pid) else "lost"
    beat = status.get("heartbeat")
    if stale_after_s is not None and isinstance(beat, int | float):
        now = time.time() if now is None else now
        if now - beat > stale_after_s:
            return "lost"
    return state


def is_alive(
    status: dict[str, Any] | None,
    *,
    now: float | None = None,
    stale_after_s: float | None = STALE_AFTER_S,
) -> bool:
    """Whether the run is active and its process is not lost (`run_state`'s rule)."""
    return run_state(status, now=now, stale_after_s=stale_after_s) in ACTIVE_STATES


# ---- metrics ---------------------------------------------------------------------------------


def read_metrics(
    run_dir: str | os.PathLike[str], offset: int = 0, *, unterminated: bool = False
) -> tuple[list[dict[str, Any]], int]:
    """Records of metrics.jsonl from byte `offset`: (records, offset to read from next time).

    Only lines ending in a newline are read, so a line the run is still writing (or one torn by
    a kill) is left for the next call; `unterminated=True` also returns a last line without a
    newline when it is a whole record (a file written by hand; the next offset stays before
    it). Lines that are not JSON objects with an integer "step" are skipped. No file yet:
    ([], offset).

    A resumed run rewrites metrics.jsonl up to its checkpoint's step and logs the later steps
    again. When `offset` no longer falls at a line start of the file (it is past the end, or
    mid-line), the file was rewritten and it is read again from the start: a reader then sees
    steps it already has, and should replace its records from the first repeated step on.
    A rewritten file that is as long as `offset` with a line start there is not seen by this
    rule: `MetricsTail` also compares the file's identity, and says when it was rewritten.
    """
    records, offset, _, _ = _read_records(
        RunPaths(run_dir).metrics, offset, None, unterminated=unterminated
    )
    return records, offset


def _file_id(stat: os.stat_result) -> tuple[int, int]:
    return stat.st_dev, stat.st_ino


def _read_records(
    path: Path, offset: int, identity: tuple[int, int] | None, *, unterminated: bool = False
) -> tuple[list[dict[str, Any]], int, tuple[int, int] | None, bool]:
    """(records, next offset, the file's identity, whether it was read again from byte 0
    because it was rewritten) of metrics.jsonl from `offset`. Rewritten: `identity` (the
    (st_dev, st_ino) of the file read before; None: not known) is not this file's, or
    `offset` does not fall at a line start. The identity is taken from the open file, so it
    belongs to the bytes read even when the file is replaced meanwhile. No file: ([], offset,
    None, False)."""
    try:
        with open(path, "rb") as f:
            now = _file_id(os.fstat(f.fileno()))
            rewritten = identity is not None and now != identity  # replaced: write_atomic
            if rewritten:
                offset = 0
            elif offset > 0:
                f.seek(offset - 1)
                if f.read(1) != b"\n":  # past the end, or mid-line: rewritten in place
                    offset, rewritten = 0, True
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset, None, False
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()
    if unterminated and end < len(data):
        lines.append(data[end:])
    records = []
    for line in lines:
        try:
            record = json.loads(line, parse_constant=_nonfinite)
        except ValueError:
            continue
        step = record.get("step") if isinstance(record, dict) else None
        if isinstance(step, int) and not isinstance(step, bool):  # a step that is a number
            records.append(record)
    return records, offset + end, now, rewritten


class MetricsTail:
    """Follows metrics.jsonl of a run as it grows, and as a resume or an anomaly rollback
    rewrites it: the one metrics follower for everything that watches runs (sweeps, the
    server, a dashboard).

        tail = MetricsTail(run_dir)
        new, rewritten = tail.read()  # call again and again
        tail.records                  # the run's whole current history

    The engine cuts metrics.jsonl back to a checkpoint's step by replacing it atomically
    (`kiln.files.write_atomic`: a new file), then logs the later steps again. A rewrite is
    seen when the file is another one (its (st_dev, st_ino) changed), or when the offset read
    up to no longer falls at a line start (`read_metrics`' rule: a file cut in place), or
    when the file is gone after being read. Then the file is read again from byte 0, `read`
    returns the whole new history with rewritten=True, and `records` is replaced by it (the
    rows the rollback dropped are gone from it).
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.path = RunPaths(run_dir).metrics
        self.offset = 0
        """The byte offset read up to (a line start of the file read)."""
        self.records: list[dict[str, Any]] = []
        """Every record of the current history, in file order."""
        self._identity: tuple[int, int] | None = None

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        """(the records logged since the last call, whether the file was rewritten: then the
        records are the whole new history, and `records` holds just them)."""
        records, offset, identity, rewritten = _read_records(self.path, self.offset, self._identity)
        if identity is None and self._identity is not None:  # removed (a run started afresh)
            records, offset, rewritten = [], 0, True
        self._identity, self.offset = identity, offset
        if rewritten:
            self.records = list(records)
        else:
            self.records.extend(records)
        return records, rewritten


# ---- anomalies -------------------------------------------------------------------------------


def read_anomalies(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of anomalies.jsonl, in file order; [] when the run has none (no file).

    One record per anomalous optimizer step the run judged (`train.anomaly`): step (1-based,
    as metrics.jsonl's), micro_step (the global micro-batch count of the first bad micro-batch,
    or None), epoch, kind (nan_loss, inf_loss, nan_grad, inf_grad, spike), value (the loss or
    gradient norm; non-finite ones as the strings "nan", "inf", "-inf"), z (a spike's z-score,
    else None), action (skip, stop, rollback, warn), to_step (a rollback's checkpoint step),
    samples (the window's global sample indices into the training data, all ranks) and
    sources (each sample's source row as file:line, or None: packed data). A step may appear
    twice: a rollback keeps its record, and the steps after it are trained again.

    Lines that are not JSON objects with a "step" (one torn by a kill) are skipped.

    Raises:
        KilnError: the file exists but cannot be read.
    """
    path = RunPaths(run_dir).anomalies
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise KilnError(f"{path}: cannot read ({first_line(exc)})") from None
    records = []
    for line in data.splitlines():
        try:
            record = json.loads(line, parse_constant=_nonfinite)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


# ---- other files -----------------------------------------------------------------------------


def read_summary(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """summary.json, or None while the run has not written it (running, failed or killed).

    Raises:
        KilnError: the file exists but cannot be read or is not JSON.
    """
    return _read_json(RunPaths(run_dir).summary, strict=True)


def config_file(path: str | os.PathLike[str]) -> Path | None:
    """The kiln config saved at `path`: kiln_config.yaml of final/ (or of a model directory
    kiln wrote), else config.yaml of a run directory or a checkpoint; None when neither."""
    for name in (FINAL_CONFIG, CONFIG):
        file = Path(path) / name
        if file.is_file():
            return file
    return None


def read_config_raw(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The kiln config saved at `path` (`config_file`) as a plain mapping, not validated
    (yaml.safe_load); None when there is none.

    Raises:
        KilnError: the file cannot be read, is not YAML, or is not a mapping of sections.
    """
    import yaml  # light, but only readers of configs pay for it

    file = config_file(path)
    if file is None:
        return None
    try:
        raw = yaml.safe_load(file.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
        raise KilnError(f"{file}: unreadable: {first_line(exc)}") from None
    if not isinstance(raw, dict):
        raise KilnError(f"{file}: not a kiln config (expected a mapping of sections)")
    return raw


# ---- listings --------------------------------------------------------------------------------


class CheckpointEntry(NamedTuple):
    """One checkpoints/step-<N> directory."""

    step: int
    path: Path
    manifest: dict[str, Any] | None
    """manifest.json (files, sizes, checksums, step, metrics, config_hash), when readable."""
    complete: bool
    """Its manifest is valid and every file has the recorded size (`CheckpointManager.list`);
    checksums are not read here (`CheckpointManager.verify` does, before loading)."""


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointEntry]:
    """Every checkpoints/step-<N> directory of a run, complete or not, by step (staging
    directories of a checkpoint being written are not listed)."""
    # Imported here: kiln.checkpoint may come to take its layout from this module.
    from kiln.checkpoint import CheckpointManager

    root = RunPaths(run_dir).checkpoints
    if not root.is_dir():
        return []
    complete = {info.path for info in CheckpointManager(root).list()}
    found = []
    for path in root.iterdir():
        step = step_of(path)
        if step is None or not path.is_dir():
            continue
        manifest = _read_json(path / MANIFEST, strict=False)
        ok = manifest is not None and path in complete
        found.append(CheckpointEntry(step, path, manifest, ok))
    return sorted(found, key=lambda c: (c.step, c.path))


class RunInfo(NamedTuple):
    """A run directory found by `list_runs`."""

    path: Path
    status: dict[str, Any] | None
    state: str
    """`run_state(status)`: "unknown" without status.json."""


def list_runs(root: str | os.PathLike[str], *, recursive: bool = False) -> list[RunInfo]:
    """The run directories (holding config.yaml or status.json) directly under `root`, or at
    any depth with `recursive` (never inside a run, nor in hidden directories), by path."""
    found = []
    pending = [Path(root)]
    while pending:
        try:
            children = [p for p in pending.pop().iterdir() if not p.name.startswith(".")]
        except OSError:  # removed meanwhile, or not readable
            continue
        for path in children:
            if not path.is_dir():
                continue
            if RunPaths(path).is_run():
                status = read_status(path)
                found.append(RunInfo(path, status, run_state(status)))
            elif recursive:
                pending.append(path)
    return sorted(found, key=lambda run: run.path)
