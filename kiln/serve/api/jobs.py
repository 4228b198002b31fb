"""Jobs: `/api/training/jobs` (docs/serve.md): start one (from a config or a saved one), list
them, read one, stop, resume, read its output."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from kiln.errors import KilnError
from kiln.runs import RunPaths, step_of
from kiln.serve.api.common import (
    JSON_ERRORS,
    ConfinementDep,
    ExecutorDep,
    StateDirDep,
    StoreDep,
    checked,
    job_or_404,
)
from kiln.serve.api.configs import Config
from kiln.serve.confine import Confinement
from kiln.serve.store import QUEUED, RESUMABLE, JobRow, Store, new_id
from kiln.serve.views import describe

__all__ = ["StartIn", "router"]


class StartIn(BaseModel):
    config: Config | None = None
    config_id: str | None = None
    dataset_path: str | None = None
    name: str | None = Field(None, max_length=200)
    nproc: int = Field(
        1, ge=1, le=64, strict=True, description="ranks on one node (kiln train --nproc)"
    )


router = APIRouter()


def _requested(body: StartIn, store: Store, confinement: Confinement) -> tuple[dict, str | None]:
    """The config a start request names (given, or saved: 404 when it is not), with
    `dataset_path` (confined: 422) as its `data.train`, and the job's name when known."""
    if (body.config is None) == (body.config_id is None):
        raise HTTPException(422, "give config or config_id, one of them")
    config, name = body.config, body.name
    if body.config_id is not None:
        saved = store.config(body.config_id)
        if saved is None:
            raise HTTPException(404, f"no config {body.config_id}")
        config, name = saved.config, name or saved.name
    config = dict(config or {})
    if body.dataset_path is not None:
        try:
            train = confinement.read("dataset_path", body.dataset_path)
        except KilnError as exc:
            raise HTTPException(422, exc.problems) from None
        data = config.get("data")
        config["data"] = {**(data if isinstance(data, dict) else {}), "train": train}
    return config, name


@router.post("/api/training/jobs/start", status_code=201)
def start_job(
    body: StartIn, store: StoreDep, confinement: ConfinementDep, state_dir: StateDirDep
) -> dict[str, Any]:
    config, name = _requested(body, store, confinement)
    job_id = new_id()
    run_dir = state_dir / "runs" / job_id
    config = checked(config, confinement, run_dir)
    job = JobRow(
        id=job_id,
        name=name or str(config.get("name") or job_id),
        config=config,
        config_id=body.config_id,
        run_dir=str(run_dir),
        state=QUEUED,
        attempt=0,
        resume=False,
        nproc=body.nproc,
        created=time.time(),
    )
    return describe(store.add_job(job))


@router.get("/api/training/jobs")
def list_jobs(store: StoreDep) -> list[dict[str, Any]]:
    return [describe(j) for j in store.jobs()]


@router.get("/api/training/jobs/{job_id}/status")
def job_status(job_id: str, store: StoreDep) -> dict[str, Any]:
    return describe(job_or_404(store, job_id))


@router.post("/api/training/jobs/{job_id}/stop", status_code=202)
def stop_job(job_id: str, store: StoreDep, executor: ExecutorDep) -> dict[str, Any]:
    return describe(executor.stop(job_or_404(store, job_id)))


@router.post("/api/training/jobs/{job_id}/resume", status_code=202)
def resume_job(job_id: str, store: StoreDep, executor: ExecutorDep) -> dict[str, Any]:
    job = job_or_404(store, job_id)
    if job.state not in RESUMABLE:
        raise HTTPException(
            409,
            f"job {job_id} is {job.state}: only a paused, stopped, failed or lost job resumes",
        )
    if not _has_checkpoint(job.run_dir):
        raise HTTPException(409, f"job {job_id} has no checkpoint to resume from")
    return describe(executor.resume(job))


def _has_checkpoint(run_dir: str) -> bool:
    """Whether the run has a checkpoints/step-<N> directory (complete or not: `kiln train
    --resume` picks the newest complete one, or says there is none)."""
    root = RunPaths(run_dir).checkpoints
    return root.is_dir() and any(step_of(p) is not None for p in root.iterdir())


@router.get(
    "/api/training/jobs/{job_id}/logs", response_class=PlainTextResponse, responses=JSON_ERRORS
)
def job_logs(
    job_id: str, store: StoreDep, executor: ExecutorDep, tail: int = Query(200, ge=1, le=100_000)
) -> PlainTextResponse:
    lines = executor.logs(job_or_404(store, job_id))
    return PlainTextResponse("\n".join(lines[-tail:]) + ("\n" if lines else ""))
