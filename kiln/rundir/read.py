"""Readers of the run directory, for everything that drives runs without a live Trainer
(sweeps, the REST server, a dashboard, `kiln report`, `kiln eval`): status.json and the run's
state, metrics.jsonl from an offset (rollback-aware: `MetricsTail`), anomalies.jsonl,
summary.json, the saved config, and listings of checkpoints and runs. They only read; the
engine writes. Public through `kiln.runs`.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple

from kiln.errors import KilnError, first_line
from kiln.rundir.layout import (
    ACTIVE_STATES,
    CONFIG,
    FINAL_CONFIG,
    MANIFEST,
    RunPaths,
    step_of,
)

__all__ = [
    "STALE_AFTER_S",
    "CheckpointEntry",
    "MetricsTail",
    "RunInfo",
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
    "run_state",
]

STALE_AFTER_S = 1800.0
"""Default heartbeat age after which a run on another host counts as lost. The engine rewrites
status.json at the start, at every log step and after each validation, so the gap can be long
(data preparation, a slow validation): pick a value above the longest one."""
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
    "world_size",
)


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
    reason} or None), exit_code, error (the error's first line when failed), run_dir,
    world_size (the ranks it runs on now). `world_size_changes`, when the run changed world
    size: [{step, from, to, reason, time}] (reason: node left, node joined, resumed). A newer
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
    # Imported here: a building block (it takes its names from kiln.rundir.layout), loaded
    # only when asked, so `import kiln.runs` stays light.
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
