"""Running jobs: each a `kiln train` subprocess in its own process group, started from a
queue with a concurrency limit, followed through its process and its run directory.

States: queued -> starting -> running -> succeeded | failed | diverged | paused | stopped, or
lost (its process vanished without writing an end state: killed by a signal the server did
not send, SIGKILL or the OOM killer, or gone while the server was down; resumable). Stop =
SIGTERM to the group (the run checkpoints and exits 3: paused), escalated to SIGKILL after
`grace_s`. Resume = a new attempt of the job with `kiln train --resume RUN_DIR`. Jobs never
depend on the server: one started before a restart is found again by its pid and that
process's start time, and one that ended meanwhile is judged by the state and exit code its
status.json recorded.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Protocol

import yaml

from kiln.runs import read_status
from kiln.serve.store import JobRow, Store

__all__ = [
    "Executor",
    "LocalExecutor",
    "QueueExecutor",
    "describe",
    "process_start",
    "reindex",
    "state_for_exit",
]

log = logging.getLogger("kiln")

_END_STATES = {
    "finished": "succeeded",
    "paused": "paused",
    "stopped": "stopped",
    "diverged": "diverged",
    "failed": "failed",
}
"""status.json's end state -> the job's."""


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22), or
    None when it does not run (or is a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


def state_for_exit(code: int | None, run_dir: Path, stop_requested: bool) -> str:
    """The job's state after its process ended with `code` (None: unknown, it was not our
    child): status.json's end state when it wrote one, else by the exit code. A process
    killed by a signal (a negative code, or 128 + the signal through a shell) without an end
    state is `lost`, as it is when the server was down (None): the same kill gives the same
    state either way; `stopped` when the server asked it to stop."""
    status = read_status(run_dir) or {}
    recorded = _END_STATES.get(str(status.get("state")))
    if recorded is not None and (code is None or code == status.get("exit_code")):
        return recorded
    if code == 0:
        return "succeeded"
    if code == 3:
        return "paused"
    if code == 4:
        return "diverged"
    killed = code is None or code < 0 or code > 128
    if killed and stop_requested and code is not None:
        return "stopped"  # the server's SIGKILL after the grace period
    return "lost" if killed else "failed"


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
            for job in self.store.jobs(("starting", "running")):
                ended, code = self._poll(job)
                if ended:
                    self._ended(job, code)

    def tick(self) -> None:
        """Follow running jobs, escalate overdue stops, start queued jobs while there is room."""
        with self.lock:
            for job in self.store.jobs(("starting", "running")):
                ended, code = self._poll(job)
                if ended:
                    self._ended(job, code)
                    continue
                if job.state == "starting" and (read_status(job.run_dir) or {}).get("state"):
                    self.store.update_job(job.id, state="running")
                if job.stop_requested and time.time() - job.stop_requested > self.grace_s:
                    self._kill(job)
            running = len(self.store.jobs(("starting", "running")))
            for job in self.store.jobs(("queued",)):
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
            if job.state in ("starting", "running"):
                self._cancel(job)
                return self.store.update_job(job.id, stop_requested=time.time())
            return job

    def resume(self, job: JobRow) -> JobRow:
        """Queue the next attempt, continuing from the run's checkpoint."""
        with self.lock:
            return self.store.update_job(job.id, state="queued", resume=True)


SERVER_SECRETS = ("KILN_SERVE_TOKEN", "KILN_SERVE_READ_TOKEN")
"""The server's own credentials: a job never sees them (a client's config could name them as a
notifier's `token_env` and have a job send them on)."""


def job_env() -> dict[str, str]:
    """The environment a job runs in: the server's, less its credentials."""
    return {k: v for k, v in os.environ.items() if k not in SERVER_SECRETS}


class LocalExecutor(QueueExecutor):
    """Jobs as subprocesses on this machine, each in its own session (process group: torchrun
    and its ranks are one group), found again after a restart by pid and start time."""

    def __init__(self, store: Store, max_concurrent: int = 1, grace_s: float = 60.0) -> None:
        super().__init__(store, max_concurrent, grace_s)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _submit(self, job: JobRow, command: list[str], logfile: Path) -> dict[str, Any]:
        with logfile.open("a") as out:
            out.write(f"--- attempt {job.attempt}: {' '.join(command)}\n")
            out.flush()
            proc = subprocess.Popen(
                command,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=job_env(),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs[job.id] = proc
        return {"pid": proc.pid, "pid_start": process_start(proc.pid), "handle": None}

    def _poll(self, job: JobRow) -> tuple[bool, int | None]:
        proc = self.procs.get(job.id)
        if proc is not None:  # our child: its exit code
            code = proc.poll()
            if code is not None:
                del self.procs[job.id]
            return code is not None, code
        alive = job.pid is not None and process_start(job.pid) == job.pid_start
        return not alive, None  # an earlier server's: status.json will tell

    def _signal(self, job: JobRow, sig: signal.Signals) -> None:
        if job.pid is None or process_start(job.pid) != job.pid_start:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(job.pid, sig)  # its own session: the group is the job (torchrun, ranks)

    def _cancel(self, job: JobRow) -> None:
        self._signal(job, signal.SIGTERM)

    def _kill(self, job: JobRow) -> None:
        self._signal(job, signal.SIGKILL)

    def logs(self, job: JobRow) -> list[str]:
        logfile = Path(job.run_dir).parent / f"{job.id}.log"
        return logfile.read_text(errors="replace").splitlines() if logfile.is_file() else []


def describe(job: JobRow) -> dict[str, Any]:
    """A job for the API: the row, and what its status.json says now."""
    status = read_status(job.run_dir) or {}
    out = job.to_dict()
    out.update({k: status.get(k) for k in ("step", "total_steps", "epoch", "eta_s", "heartbeat")})
    out["stop_requested"] = job.stop_requested is not None
    return out


def reindex(store: Store, runs_root: Path) -> list[str]:
    """Add to `store` every job whose run directory is under `runs_root` and which the store
    does not know (a lost or new database): its config from `<id>.yaml` beside it (else the
    run's config.yaml), its state from status.json. The ids added."""
    from kiln.runs import read_config_raw, run_state

    added = []
    known = {job.id for job in store.jobs()}
    for run_dir in sorted(p for p in runs_root.glob("*") if p.is_dir()):
        if run_dir.name in known:
            continue
        saved = run_dir.parent / f"{run_dir.name}.yaml"
        config = yaml.safe_load(saved.read_text()) if saved.is_file() else read_config_raw(run_dir)
        if not isinstance(config, dict):
            continue
        config.pop("output_dir", None)
        status = read_status(run_dir) or {}
        state = run_state(status) if status else "lost"
        alive = state in ("starting", "running")
        job_state = "running" if alive else _END_STATES.get(state, "lost")
        here = status.get("host") == socket.gethostname()  # another machine's pid means nothing
        pid = status.get("pid") if alive and here else None
        stamp = status.get("started_at") or run_dir.stat().st_mtime
        store.add_job(
            JobRow(
                id=run_dir.name,
                name=str(config.get("name") or run_dir.name),
                config=config,
                run_dir=str(run_dir),
                state=job_state,
                attempt=1,
                resume=False,
                pid=pid,
                pid_start=process_start(pid) if pid else None,
                exit_code=status.get("exit_code"),
                error=status.get("error"),
                created=float(stamp),
                started=float(stamp),
            )
        )
        added.append(run_dir.name)
    return added
