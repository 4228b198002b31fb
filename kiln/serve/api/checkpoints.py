"""A job's checkpoints: the list, a whole checkpoint as a streamed tar, one file with HTTP
Range (docs/serve.md). Only complete checkpoints (and final/) are served."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse, StreamingResponse

from kiln.serve.api.common import BYTES, JSON_ERRORS, StoreDep, job_metric, job_or_404
from kiln.serve.store import Store
from kiln.serve.views import checkpoint_dir, complete_checkpoints, tar_stream

__all__ = ["router"]

router = APIRouter()


@router.get("/api/training/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, store: StoreDep) -> list[dict[str, Any]]:
    job = job_or_404(store, job_id)
    found = complete_checkpoints(job.run_dir, job_metric(job))
    return [{**asdict(c), "id": f"{job.id}.{c.id}"} for c in found]


def _checkpoint_or_404(store: Store, checkpoint_id: str) -> Path:
    """The directory of `<job>.step-N` or `<job>.final`, when it is complete; else 404."""
    job_id, _, name = checkpoint_id.partition(".")
    where = checkpoint_dir(job_or_404(store, job_id).run_dir, name)
    if where is None:
        raise HTTPException(404, f"no complete checkpoint {checkpoint_id}")
    return where


@router.get(
    "/api/training/checkpoints/{checkpoint_id}/download",
    response_class=StreamingResponse,
    responses={200: {"content": {"application/x-tar": {}}}, **JSON_ERRORS},
)
def download(checkpoint_id: str, store: StoreDep) -> StreamingResponse:
    where = _checkpoint_or_404(store, checkpoint_id)
    headers = {"Content-Disposition": f'attachment; filename="{checkpoint_id}.tar"'}
    return StreamingResponse(tar_stream(where), media_type="application/x-tar", headers=headers)


@router.get(
    "/api/training/checkpoints/{checkpoint_id}/files/{name:path}",
    response_class=FileResponse,
    responses={200: BYTES, 206: BYTES, **JSON_ERRORS},
)
def checkpoint_file(checkpoint_id: str, name: str, store: StoreDep) -> FileResponse:
    where = _checkpoint_or_404(store, checkpoint_id)
    path = (where / name).resolve()
    if not path.is_file() or where.resolve() not in path.parents:
        raise HTTPException(404, f"no file {name} in {checkpoint_id}")
    return FileResponse(path)  # HTTP Range: 206 with the bytes asked for
