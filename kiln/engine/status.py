"""status.json: what a run is doing, for readers outside the process (sweeps, the server, a
dashboard, `kiln runs`). Written atomically (never torn) at the start, at every log step, after
each validation and at the end; `kiln.runs.read_status` reads it.

States: starting (setting up), running, paused (resumable stop), stopped (ended without a
final model, e.g. pruned: resumable), finished (early stopping included), failed (with the
error line and exit code), diverged. Their exit codes: `kiln.runs.STATE_EXIT_CODES`.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kiln.errors import KilnError, first_line
from kiln.files import StorageFull, json_text, write_atomic
from kiln.runs import STATE_EXIT_CODES, ExitCode, RunPaths

if TYPE_CHECKING:
    from kiln.engine.control import StopRequest
    from kiln.engine.state import TrainState

__all__ = ["StatusFile", "exit_code_for", "final_state", "mark_paused"]

FORMAT = 1


def exit_code_for(exc: BaseException) -> int:
    """The `kiln train` exit code a run that raised `exc` ends with."""
    from kiln.engine.signals import StoppedBeforeStart

    if isinstance(exc, StoppedBeforeStart):
        return exc.exit_code
    if isinstance(exc, KilnError):
        return ExitCode.BAD_INPUT
    if isinstance(exc, StorageFull):
        return ExitCode.STORAGE_FULL
    if isinstance(exc, KeyboardInterrupt):
        return ExitCode.ABORTED
    return STATE_EXIT_CODES["failed"]


def final_state(stop: StopRequest | None) -> tuple[str, int]:
    """(state, exit code) of a run that returned from its loop after `stop` (None: ran out)."""
    if stop is None:
        state = "finished"
    elif stop.kind == "diverged":
        state = "diverged"
    elif stop.resumable:
        state = "paused"
    elif not stop.write_final:
        state = "stopped"
    else:
        state = "finished"
    return state, STATE_EXIT_CODES[state]


def mark_paused(run_dir: Path, line: str) -> None:
    """status.json of a run whose launcher ended it between attempts (an elastic launch whose
    rendezvous fell short of its minimum of nodes): paused, exit 3, with `line` as the stop's
    reason (the ranks' last write may say failed: a peer died, then no restart could start)."""
    from kiln.runs import read_status

    data = read_status(run_dir)
    if data is None:
        return
    data.update(
        state="paused",
        exit_code=ExitCode.PAUSED,
        error=None,
        stop={"kind": "rendezvous", "reason": line.removeprefix("kiln: ")},
        heartbeat=time.time(),
    )
    path = RunPaths(run_dir).status
    with contextlib.suppress(OSError):
        write_atomic(path, json_text(data, indent=1) + "\n", durable=False)


class StatusFile:
    """Writes `<run_dir>/status.json` (only on the main rank: `enabled`)."""

    def __init__(self, run_dir: Path, *, enabled: bool = True) -> None:
        from kiln import __version__

        self.path = RunPaths(run_dir).status
        self.enabled = enabled
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "state": "starting",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "kiln_version": __version__,
            "run_dir": str(run_dir),
            "started_at": time.time(),
            "heartbeat": time.time(),
            "step": 0,
            "total_steps": None,
            "epoch": 0,
            "tokens": 0,
            "train": {},
            "val": {},
            "eta_s": None,
            "stop": None,
            "exit_code": None,
            "error": None,
            "world_size": None,
        }
        self._rate_from: tuple[float, int] | None = None
        self._begun = False

    def begin(self, *, resumed: bool = False) -> None:
        """This process owns the run directory now (locked, checked): write `starting`. Until
        then nothing is written, so a refused start never touches another run's status. A
        resumed run keeps the record of its earlier world-size changes."""
        self._begun = self.enabled
        if resumed and self.enabled:
            from kiln.runs import read_status

            before = read_status(self.path.parent) or {}
            changes = before.get("world_size_changes")
            if isinstance(changes, list):
                self.data["world_size_changes"] = changes
        self.data["started_at"] = time.time()
        self.write("starting")

    def write(self, state: str | None = None, train_state: TrainState | None = None) -> None:
        """Rewrite status.json with the current counters (and `state`, when it changes)."""
        if not self._begun:
            return
        now = time.time()
        if state is not None:
            self.data["state"] = state
        if train_state is not None:
            self._counters(train_state, now)
        self.data["heartbeat"] = now
        if self.path.parent.is_dir():
            write_atomic(self.path, json_text(self.data, indent=1) + "\n", durable=False)

    def _counters(self, s: TrainState, now: float) -> None:
        self.data.update(
            step=s.step, total_steps=s.total_steps, epoch=s.epoch, tokens=s.tokens_seen
        )
        if self._rate_from is None:
            self._rate_from = (now, s.step)
        since, step0 = self._rate_from
        done = s.step - step0
        if done > 0 and s.total_steps:
            self.data["eta_s"] = (now - since) / done * max(0, s.total_steps - s.step)

    def metrics(self, record: dict[str, Any]) -> None:
        """Keep the latest train or val record (written with the next `write`)."""
        split = "val" if record.get("split") == "val" else "train"
        self.data[split] = {k: v for k, v in record.items() if k != "split"}

    def end(
        self,
        train_state: TrainState,
        stop: StopRequest | None,
        exc: BaseException | None = None,
    ) -> None:
        """The final write: finished / paused / stopped / diverged, or failed with the error."""
        if exc is not None:
            from kiln.engine.signals import StoppedBeforeStart

            code = exit_code_for(exc)
            state = (
                "paused"
                if isinstance(exc, StoppedBeforeStart) and code == ExitCode.PAUSED
                else "failed"
            )
            if isinstance(exc, (StoppedBeforeStart, KeyboardInterrupt)) and state != "paused":
                state = "stopped"
            self.data["error"] = first_line(exc) if state == "failed" else None
        else:
            state, code = final_state(stop)
        if stop is not None:
            self.data["stop"] = stop.to_dict()
        self.data["exit_code"] = code
        self._counters(train_state, time.time())
        self.data["eta_s"] = 0.0 if state == "finished" else None
        with contextlib.suppress(OSError):  # the run's own error matters more
            self.write(state)
