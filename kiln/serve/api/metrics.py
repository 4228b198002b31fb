"""What a job's run reports: the latest metrics, the history, the throughput, and the live
event stream (Server-Sent Events), all read from its run directory (docs/serve.md)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import StreamingResponse

from kiln.files import finite_json
from kiln.runs import MetricsTail, RunPaths
from kiln.serve.api.common import JSON_ERRORS, StoreDep, job_metric, job_or_404
from kiln.serve.store import ACTIVE, JobRow, Store
from kiln.serve.views import complete_checkpoints, current, describe, history, throughput

__all__ = ["router"]

router = APIRouter()
_POLL_S = 0.5
"""How often the event stream looks at the run directory and the job's state."""


@router.get("/api/training/jobs/{job_id}/metrics")
def job_metrics(job_id: str, store: StoreDep) -> dict[str, Any]:
    return current(job_or_404(store, job_id).run_dir)


@router.get("/api/training/jobs/{job_id}/metrics/history")
def job_history(
    job_id: str,
    store: StoreDep,
    since_step: int | None = Query(None, ge=0),
    until_step: int | None = Query(None, ge=0),
    max_points: int = Query(1000, ge=2, le=100_000),
) -> dict[str, Any]:
    return history(job_or_404(store, job_id).run_dir, since_step, until_step, max_points)


@router.get("/api/training/jobs/{job_id}/throughput")
def job_throughput(job_id: str, store: StoreDep) -> dict[str, Any]:
    return throughput(job_or_404(store, job_id).run_dir)


@router.get(
    "/api/training/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **JSON_ERRORS},
)
async def job_events(job_id: str, request: Request, store: StoreDep) -> StreamingResponse:
    """Server-Sent Events: `metrics` (id = step), `checkpoint` as each complete checkpoint
    (and final/) lands, `status` on each change of state, `end` when the job ends.
    Resumable: records and checkpoints after step `Last-Event-ID` are sent first."""
    job = job_or_404(store, job_id)
    given = request.headers.get("last-event-id", "").strip()
    try:  # the step of the last event seen (metrics ids are steps)
        after = int(given) if given else -1
    except ValueError:
        raise HTTPException(
            400, f"Last-Event-ID: expected a step number (an integer), got {given[:40]!r}"
        ) from None
    return StreamingResponse(_events(store, job, after, request), media_type="text/event-stream")


def _event(kind: str, data: Any, event_id: int | None = None) -> str:
    """One Server-Sent Event."""
    head = "" if event_id is None else f"id: {event_id}\n"
    return f"{head}event: {kind}\ndata: {json.dumps(data)}\n\n"


def _new_checkpoints(job: JobRow, after: int, seen: set[str]) -> list[dict[str, Any]]:
    """Complete checkpoints (and final/) of the job past step `after` not in `seen` (which
    gains them), as the checkpoints route lists them."""
    found = []
    for c in complete_checkpoints(job.run_dir, job_metric(job)):
        if c.id not in seen and (c.final or (c.step or 0) > after):
            seen.add(c.id)
            found.append({**asdict(c), "id": f"{job.id}.{c.id}"})
    return found


class _Records:
    """Which metrics records a stream sends: those past step `after` (the client has the
    rest), each once; and once a resume or an anomaly rollback has rewritten metrics.jsonl
    (`MetricsTail`), every record of the new history the client does not have as it is, at
    any step (the steps logged again, with their new values)."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.rewound = False
        self.known: dict[tuple[str, int], dict[str, Any]] = {}
        """What the client has, by (split, step): what it had (at or before `after`) and
        what was sent."""

    def of(self, records: list[dict[str, Any]], rewritten: bool) -> list[dict[str, Any]]:
        """The records to send of those `MetricsTail.read` returned."""
        self.rewound = self.rewound or rewritten
        out = []
        for r in records:
            key = (str(r.get("split")), r["step"])
            if self.known.get(key) == r:
                continue
            self.known[key] = r
            if r["step"] > self.after or self.rewound:
                out.append(r)
        return out


async def _events(store: Store, job: JobRow, after: int, request: Request) -> AsyncIterator[str]:
    tail, state = MetricsTail(job.run_dir), None
    news = _Records(after)
    seen: set[str] = set()
    paths, stamp = RunPaths(job.run_dir), None  # the run dir changes when a checkpoint lands
    while True:
        for r in news.of(*tail.read()):
            yield _event("metrics", finite_json(r), r["step"])
        now_stamp = [_mtime(paths.checkpoints), _mtime(paths.final)]
        if now_stamp != stamp:
            stamp = now_stamp
            for c in _new_checkpoints(job, after, seen):  # no id: metrics ids stay the resume point
                yield _event("checkpoint", c)
        now = store.job(job.id)
        if now is not None and now.state != state:
            state = now.state
            yield _event("status", describe(now))
            if state not in ACTIVE:
                yield _event("end", {"state": state})
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(_POLL_S)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
