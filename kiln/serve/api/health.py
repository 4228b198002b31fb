"""The routes open without a token: the dashboard page and the health check."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import APIRouter
from fastapi.responses import FileResponse

from kiln.serve.api.common import StoreDep
from kiln.serve.store import RUNNING

__all__ = ["router"]

router = APIRouter()
_DASHBOARD = Path(__file__).parent.parent / "static" / "index.html"


@router.get("/", include_in_schema=False)
def dashboard() -> FileResponse:
    """The dashboard: one static page that reads this API (docs/serve.md)."""
    return FileResponse(_DASHBOARD)


@router.get("/api/health")
def health(store: StoreDep) -> dict[str, Any]:
    return {"ok": True, "jobs": len(store.jobs(RUNNING))}
