"""The job queue and its states, wherever the jobs run: at most `max_concurrent` at once,
launched in order, followed to their end, stopped with a grace period, resumed as a new
attempt, and found again after a restart (`reconcile`).

States: queued -> starting -> running -> succeeded | failed | diverged | paused | stopped, or
lost (its process vanished without writing an end state: killed by a signal the server did
not send, SIGKILL or the OOM killer, or gone while the server was down; resumable). A job's
state comes from its run's (`kiln.serve.store.JOB_STATES`, the one table): status.json's end
state when it wrote one, else the exit code (`kiln.runs.STATE_EXIT_CODES`). Jobs never depend
on the server: one that ended while it was down is judged by what its status.json recorded.

How a job's process is started, polled, signalled and read is the subclass's: kiln/serve/
executor.py (local subprocesses), kiln/serve/ray_jobs.py (Ray Jobs).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import yaml

from kiln.runs import END_STATES, STATE_EXIT_CODES, read_status
from kiln.serve.store import JOB_STATES, LOST, QUEUED, RUNNING, JobRow, Store

__all__ = ["Executor", "QueueExecutor", "state_for_exit"]

log = logging.getLogger("kiln")

_RUN_STATE_OF_EXIT = {int(code): state for state, code in reversed(STATE_EXIT_CODES.items())}
"""An exit code -> the run state it says, for a run that recorded none (the table's first
state for a code: 3 reads as paused, not stopped)."""


def state_for_exit(code: int | None, run_dir: Path, stop_requested: bool) -> str:
    """The job's state after its process ended with `code` (None: unknown, it was not our
    child): status.json's end state when it wrote one, else by the exit code. A process
    killed by a signal (a negative code, or 128 + the signal through a shell) without an end
    state is `lost`, as it is when the server was down (None): the same kill gives the same
    state either way; `stopped` when the server asked it to stop."""
    status = read_status(run_dir) or {}
    recorded = str(status.get("state"))
    if recorded in END_STATES and (code is None or code == status.get("exit_code")):
        return JOB_STATES[recorded]
    if code in _RUN_STATE_OF_EXIT:
        return JOB_STATES[_RUN_STATE_OF_EXIT[code]]
    killed = code is None or code < 0 or code > 128
    if killed and stop_requested and code is not None:
        return "stopped"  # the server's SIGKILL after the grace period
    return LOST if killed else "failed"


class Executor(Protocol):
    """What the server needs from where jobs run. The store holds the jobs; an executor
    moves them between states and must survive the server: `reconcile` finds, after a
    restart, what its jobs did meanwhile.

    - `start()`: reconcile, then follow jobs in the background (`tick` every interval): launch
      queued jobs while there is room, notice ended ones, escalate overdue stops.
    - `stop(job)`: ask a job to stop with a checkpoint (`kiln train`'s SIGTERM: exit 3).
    - `resume(job)`: queue its next attempt, continuing from its checkpoint.
    - `logs(job)`: the output of its attempts.
    - `close()`: stop following (the jobs go on).

    `QueueExecutor` holds the queue and the states; an executor for another place says only
    how to submit a command, poll it, cancel it gracefully, kill it and read its output.
    `LocalExecutor` runs subprocesses here and `RayExecutor` (kiln/serve/ray_jobs.py) Ray
    Jobs. Slurm would plug in the same way: `sbatch` the `kiln train` command (`--nproc` under
    `srun` for several ranks) and keep the job id as the handle, poll `sacct` for the end and
    the exit code, cancel with `scancel --signal=TERM` (then `scancel` after the grace period),
    read the output file `sbatch --output` wrote, and take the state from status.json in the
    run directory on the shared file system, as these do.
    """

    def start(self, interval_s: float = 0.25) -> None: ...
    def close(self) -> None: ...
    def reconcile(self) -> None: ...
    def tick(self) -> None: ...
    def stop(self, job: JobRow) -> JobRow: ...
    def resume(self, job: JobRow) -> JobRow: ...
    def logs(self, job: JobRow) -> list[str]: ...


class QueueExecutor(ABC):
    """The queue, the loop and the states, whatever runs the jobs: at most `max_concurrent`
    at once, stops escalated after `grace_s`. Subclasses implement `_submit`, `_poll`,
    `_cancel`, `_kill` and `logs`."""

    def __init__(self, store: Store, max_concurrent: int = 1, grace_s: float = 60.0) -> None:
        self.store = store
        self.max_concurrent = max_concurrent
        self.grace_s = grace_s
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what a subclass says ------------------------------------------------------------

    @abstractmethod
    def _submit(self, job: JobRow, command: list[str], logfile: Path) -> dict[str, Any]:
        """Start `command` for `job`; the fields to store that find it again (pid, handle)."""

    @abstractmethod
    def _poll(self, job: JobRow) -> tuple[bool, int | None]:
        """Whether the job's attempt has ended, and its exit code where known."""

    @abstractmethod
    def _cancel(self, job: JobRow) -> None:
        """Ask the attempt to stop (SIGTERM to every process: it checkpoints, exits 3)."""

    @abstractmethod
    def _kill(self, job: JobRow) -> None:
        """End the attempt now (the grace period is over)."""

    @abstractmethod
    def logs(self, job: JobRow) -> list[str]:
        """The output of the job's attempts, each after a `--- attempt N:` line."""

    # ---- the loop ------------------------------------------------------------------------

    def start(self, interval_s: float = 0.25) -> None:
        self.reconcile()
        self._thread = threading.Thread(
            target=self._loop, args=(interval_s,), daemon=True, name="kiln-serve-executor"
        )
        self._thread.start()

    def close(self) -> None:
        """Stop following jobs (they go on running; a restarted server finds them again)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _loop(self, interval_s: float) -> None:
        failing = None  # the error every tick has hit since the last good one
        while not self._stop.wait(interval_s):
            try:
                self.tick()
            except Exception as exc:  # the jobs stay as they are; the next tick tries again
                if repr(exc) != failing:  # once, not four times a second (a cluster away)
                    log.exception("serve: following the jobs failed; trying again")
                failing = repr(exc)
                continue
            if failing is not None:
                log.warning("serve: following the jobs again")
                failing = None

    def reconcile(self) -> None:
        """After a (re)start: a job whose attempt still runs stays running; one whose attempt
        is gone takes the state its run recorded."""
        with self.lock:
            for job in self.store.jobs(RUNNING):
                ended, code = self._poll(job)
                if ended:
                    self._ended(job, code)

    def tick(self) -> None:
        """Follow running jobs, escalate overdue stops, start queued jobs while there is room."""
        with self.lock:
            for job in self.store.jobs(RUNNING):
                ended, code = self._poll(job)
                if ended:
                    self._ended(job, code)
                    continue
                if job.state == "starting" and (read_status(job.run_dir) or {}).get("state"):
                    self.store.update_job(job.id, state="running")
                if job.stop_requested and time.time() - job.stop_requested > self.grace_s:
                    self._kill(job)
            running = len(self.store.jobs(RUNNING))
            for job in self.store.jobs((QUEUED,)):
                if running >= self.max_concurrent:
                    break
                self._launch(job)
                running += 1

    # ---- one job -------------------------------------------------------------------------

    def command(self, job: JobRow) -> list[str]:
        cmd = [sys.executable, "-m", "kiln", "-q", "train"]
        if job.resume:
            cmd += ["--resume", job.run_dir]
        else:
            cmd += [str(Path(job.run_dir).parent / f"{job.id}.yaml"), "--overwrite"]
        return cmd + (["--nproc", str(job.nproc)] if job.nproc > 1 else [])

    def _launch(self, job: JobRow) -> None:
        run_dir = Path(job.run_dir)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        config = {**job.config, "output_dir": str(run_dir)}
        (run_dir.parent / f"{job.id}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        job.attempt += 1
        found = self._submit(job, self.command(job), run_dir.parent / f"{job.id}.log")
        self.store.update_job(
            job.id,
            state="starting",
            attempt=job.attempt,
            started=time.time(),
            ended=None,
            exit_code=None,
            error=None,
            stop_requested=None,
            **found,
        )

    def _ended(self, job: JobRow, code: int | None) -> None:
        status = read_status(job.run_dir) or {}
        if code is None and status.get("exit_code") is not None:
            code = int(status["exit_code"])
        state = state_for_exit(code, Path(job.run_dir), job.stop_requested is not None)
        error = status.get("error") if state == "failed" else None
        self.store.update_job(
            job.id, state=state, exit_code=code, ended=time.time(), pid=None, error=error
        )
        log.info("serve: job %s %s (exit code %s)", job.id, state, code)

    def stop(self, job: JobRow) -> JobRow:
        """Ask the job to stop: a queued one is stopped at once; a running one gets SIGTERM
        (it checkpoints and pauses), SIGKILL after the grace period."""
        with self.lock:
            job = self.store.job(job.id) or job
            if job.state == "queued":
                return self.store.update_job(job.id, state="stopped", ended=time.time())
            if job.state in RUNNING:
                self._cancel(job)
                return self.store.update_job(job.id, stop_requested=time.time())
            return job

    def resume(self, job: JobRow) -> JobRow:
        """Queue the next attempt, continuing from the run's checkpoint."""
        with self.lock:
            return self.store.update_job(job.id, state="queued", resume=True)
