"""Jobs as local processes: each a `kiln train` subprocess in its own process group (torchrun
and its ranks are one group), started by the queue (kiln/serve/queue.py), stopped by SIGTERM
to the group (the run checkpoints and exits 3: paused), escalated to SIGKILL after `grace_s`.
A job started before a server restart is found again by its pid and that process's start
time; `reindex` rebuilds the store from the run directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import yaml

from kiln.runs import ACTIVE_STATES, read_status
from kiln.serve.queue import QueueExecutor
from kiln.serve.store import JOB_STATES, LOST, JobRow, Store

__all__ = ["SERVER_SECRETS", "LocalExecutor", "job_env", "process_start", "reindex"]


def process_start(pid: int) -> str | None:
    """The start time of process `pid` (clock ticks since boot, /proc/PID/stat field 22), or
    None when it does not run (or is a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


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
        state = run_state(status) if status else LOST
        alive = state in ACTIVE_STATES
        job_state = "running" if alive else JOB_STATES.get(state, LOST)
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
