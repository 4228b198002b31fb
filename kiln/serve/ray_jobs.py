"""Jobs on a Ray cluster through Ray Jobs (`kiln serve --executor ray --ray-address URL`).

Each attempt is a Ray job whose entrypoint is the same `kiln train` command the local
executor runs, submitted as `kiln-<job>-<attempt>` (the handle kept in the store: submitting
again after a crash finds the same job instead of starting a second). Ray runs it on a node
with the resources asked for (`gpus_per_rank` x ranks), so the nodes need kiln installed at
the server's interpreter path (one image for the cluster), and the state directory and the
server's working directory (where relative data paths point) on a shared file system: the run
directory stays the source of truth for state, metrics and checkpoints.

Stop = Ray's `stop_job`: SIGTERM to the entrypoint and its children (the run checkpoints and
exits 3: paused), SIGKILL after the grace period (`RAY_JOB_STOP_WAIT_TIME_S`, passed to the
job's supervisor). A job is followed through Ray's job status and exit code; one Ray no
longer knows (a new cluster) takes the state its status.json recorded, and one found by
`--reindex` (no handle in the store) is matched to its newest Ray job by metadata.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any

from kiln.errors import KilnError
from kiln.registry import require_extra
from kiln.serve.queue import QueueExecutor
from kiln.serve.store import JobRow, Store

__all__ = ["RayExecutor"]


class RayExecutor(QueueExecutor):
    """Jobs as Ray Jobs on the cluster whose dashboard is at `address` (`Executor`)."""

    def __init__(
        self,
        store: Store,
        address: str,
        max_concurrent: int = 1,
        grace_s: float = 60.0,
        gpus_per_rank: float = 0.0,
    ) -> None:
        super().__init__(store, max_concurrent, grace_s)
        jobs = require_extra("ray.job_submission", "ray", feature="--executor ray")
        try:
            self.client = jobs.JobSubmissionClient(address)
        except (ConnectionError, RuntimeError) as exc:
            why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise KilnError(f"--ray-address {address}: no Ray Jobs API answers ({why})") from None
        self.address = address
        self.gpus_per_rank = gpus_per_rank

    @staticmethod
    def submission_id(job: JobRow, attempt: int | None = None) -> str:
        return f"kiln-{job.id}-{attempt or job.attempt}"

    def _submit(self, job: JobRow, command: list[str], logfile: Path) -> dict[str, Any]:
        handle = self.submission_id(job)
        gpus = self.gpus_per_rank * job.nproc
        try:
            self.client.submit_job(  # in the server's directory, as the config was checked
                entrypoint=f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}",
                submission_id=handle,
                runtime_env={"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": str(int(self.grace_s))}},
                entrypoint_num_gpus=gpus or None,
                metadata={"kiln_job": job.id},
            )
        except RuntimeError as exc:  # "already exists": submitted before a crash, so adopted
            if "already exists" not in str(exc):
                raise
        return {"handle": handle, "pid": None, "pid_start": None}

    def _find(self, job: JobRow) -> JobRow:
        """A job the store knows no Ray handle for (`--reindex` found it in its run
        directory): its newest Ray job, by the `kiln_job` metadata every submission carries."""
        mine = [
            j
            for j in self.client.list_jobs()
            if (j.metadata or {}).get("kiln_job") == job.id and j.submission_id
        ]
        if not mine:
            return job
        newest = max(mine, key=lambda j: j.start_time or 0)
        attempt = int(str(newest.submission_id).rpartition("-")[2])
        return self.store.update_job(
            job.id, handle=newest.submission_id, attempt=attempt, pid=None, pid_start=None
        )

    def _poll(self, job: JobRow) -> tuple[bool, int | None]:
        if job.handle is None:
            job = self._find(job)
        if job.handle is None:
            return True, None
        try:
            info = self.client.get_job_info(job.handle)
        except RuntimeError as exc:
            if "does not exist" in str(exc):  # not this cluster's: status.json tells
                return True, None
            raise  # the cluster does not answer now: try again at the next tick
        return info.status.is_terminal(), info.driver_exit_code

    def _cancel(self, job: JobRow) -> None:
        if job.handle is not None:
            self.client.stop_job(job.handle)

    _kill = _cancel  # Ray escalates to SIGKILL itself after RAY_JOB_STOP_WAIT_TIME_S

    def logs(self, job: JobRow) -> list[str]:
        lines: list[str] = []
        for attempt in range(1, job.attempt + 1):
            handle = self.submission_id(job, attempt)
            try:
                text = self.client.get_job_logs(handle)
            except RuntimeError:  # a cluster that never ran this attempt
                continue
            lines.append(f"--- attempt {attempt}: ray job {handle}")
            lines.extend(text.splitlines())
        return lines
