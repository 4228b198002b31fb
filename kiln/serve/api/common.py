"""What the routers share: the app's state as FastAPI dependencies (`request.app.state`, set
by `create_app`), the bearer-token check, the lookups that answer 404, the validation of a
client's config, and the error schema every route documents."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request
from pydantic import BaseModel

from kiln.errors import KilnError
from kiln.serve.confine import Confinement
from kiln.serve.queue import Executor
from kiln.serve.store import JobRow, Store

__all__ = [
    "BYTES",
    "ERRORS",
    "JSON_ERRORS",
    "ConfinementDep",
    "ExecutorDep",
    "Problem",
    "StateDirDep",
    "StoreDep",
    "Tokens",
    "checked",
    "job_metric",
    "job_or_404",
    "require_token",
]


class Problem(BaseModel):
    detail: list[str] | str


_CODES = (400, 401, 403, 404, 409, 413, 422)
ERRORS = {code: {"model": Problem} for code in _CODES}
JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": "an error, as JSON",
        "content": {"application/json": {"schema": Problem.model_json_schema()}},
    }
    for code in _CODES
}
"""For routes whose success is not JSON (text, a stream, a file): their errors still are."""
BYTES = {"description": "the file's bytes", "content": {"application/octet-stream": {}}}


# ---- the app's state -------------------------------------------------------------------------


def _store(request: Request) -> Store:
    return request.app.state.store


def _executor(request: Request) -> Executor:
    return request.app.state.executor


def _confinement(request: Request) -> Confinement:
    return request.app.state.confinement


def _state_dir(request: Request) -> Path:
    return request.app.state.settings.state_dir


StoreDep = Annotated[Store, Depends(_store)]
ExecutorDep = Annotated[Executor, Depends(_executor)]
ConfinementDep = Annotated[Confinement, Depends(_confinement)]
StateDirDep = Annotated[Path, Depends(_state_dir)]


# ---- the token check ---------------------------------------------------------------------------


class Tokens:
    """The server's bearer tokens by scope ("write": everything, "read": GET and HEAD), kept
    as digests and compared in constant time; none configured: every request passes."""

    def __init__(self, write: str | None, read: str | None) -> None:
        self.digests = {
            scope: hashlib.sha256(token.encode()).digest()
            for scope, token in (("write", write), ("read", read))
            if token is not None
        }

    def check(self, request: Request) -> None:
        """401 without a known bearer token, 403 for a read token on a write request."""
        if not self.digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        scopes = {s for s, d in self.digests.items() if hmac.compare_digest(given, d)}
        if scheme.lower() != "bearer" or not scopes:
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        if "write" not in scopes and request.method not in ("GET", "HEAD"):
            raise HTTPException(403, "this token has the read scope only")


def require_token(request: Request) -> None:
    """The dependency `create_app` puts on every router but health's."""
    request.app.state.tokens.check(request)


# ---- lookups and checks ----------------------------------------------------------------------


def job_or_404(store: Store, job_id: str) -> JobRow:
    """The job, or 404."""
    job = store.job(job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


def job_metric(job: JobRow) -> str:
    """The metric the job's checkpoints are ranked by (`checkpoint.metric`)."""
    return ((job.config.get("checkpoint") or {}).get("metric")) or "val_loss"


def checked(config: dict[str, Any], confinement: Confinement, run_dir: Path) -> dict[str, Any]:
    """`config` validated as `kiln train` would, then confined (kiln/serve/confine.py): what a
    job at `run_dir` runs, every path in it absolute, and what it names checked as `kiln train`
    checks it before torch loads (data files, model directories, extras:
    `preflight.config_problems`). 422 with one line per problem."""
    from kiln.config import load_config
    from kiln.preflight import config_problems

    try:
        load_config(data=config)
        confined = confinement.confine(config, run_dir)
        problems = config_problems(load_config(data=confined))
    except KilnError as exc:
        raise HTTPException(422, str(exc).splitlines()) from None
    if problems:
        raise HTTPException(422, problems)
    return confined
