"""The REST API (FastAPI): configs, jobs, metrics, checkpoints, a live event stream.

Routes are the contract of docs/serve.md (`/api/training/...`), one router per resource in
kiln/serve/api/. Every request body is validated; a run config is checked by `RunConfig` and a
bad one answers 422 with the CLI's one-line messages. With a token configured, every route but
`/api/health` needs `Authorization: Bearer <token>` (compared in constant time, never logged):
the check is declared once, here, on the routers that need it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import Depends, FastAPI

from kiln.serve.api import checkpoints, configs, health, jobs, metrics
from kiln.serve.api.common import ERRORS, Tokens, require_token
from kiln.serve.api.http import MAX_BODY, BodyLimit, FiniteJSON, add_error_handlers
from kiln.serve.confine import Confinement
from kiln.serve.executor import LocalExecutor
from kiln.serve.queue import Executor
from kiln.serve.store import Store

__all__ = ["MAX_BODY", "Settings", "create_app", "make_executor"]


@dataclass
class Settings:
    state_dir: Path
    """Where the database (default) and the jobs' run directories live."""
    db_url: str | None = None
    token: str | None = None
    """Bearer token with the write scope (everything)."""
    read_token: str | None = None
    """Bearer token with the read scope (GET requests only)."""
    max_concurrent: int = 1
    grace_s: float = 60.0
    executor: str = "local"
    """Where jobs run: "local" (subprocesses here) or "ray" (Ray Jobs at `ray_address`)."""
    ray_address: str | None = None
    gpus_per_rank: float = 0.0
    """GPUs a Ray job asks for per rank (the entrypoint's resources)."""
    claim: bool = False
    """Hold the database as its one server while the process lives (`kiln serve`)."""
    dry_run: bool = False
    """Queue jobs but never start them (to exercise the API alone: schema fuzzing)."""
    allow_read: tuple[Path, ...] = ()
    """Roots outside the state directory jobs may read data, models, tokenizers from."""
    allow_hub: bool = False
    """Jobs may name hub datasets (`hf:`) and hub model ids."""

    @property
    def url(self) -> str:
        return self.db_url or f"sqlite:///{(self.state_dir / 'kiln-serve.db').resolve()}"


def make_executor(settings: Settings, store: Store) -> Executor:
    """Where the jobs run: `settings.executor`, "local" or "ray"."""
    if settings.executor == "ray":
        from kiln.serve.ray_jobs import RayExecutor

        assert settings.ray_address is not None, "the ray executor needs ray_address"
        return RayExecutor(
            store,
            settings.ray_address,
            settings.max_concurrent,
            settings.grace_s,
            settings.gpus_per_rank,
        )
    return LocalExecutor(store, settings.max_concurrent, settings.grace_s)


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The executor follows the jobs while the app serves (never in a dry run)."""
    if not app.state.settings.dry_run:
        app.state.executor.start()
    yield
    app.state.executor.close()


def create_app(settings: Settings) -> FastAPI:
    """The app, its store and its executor (started with the app, stopped with it); the
    routers read them from `app.state` (kiln/serve/api/common.py)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    confinement = Confinement(settings.state_dir, settings.allow_read, settings.allow_hub)
    store = Store(settings.url, claim=settings.claim)
    executor = make_executor(settings, store)

    app = FastAPI(
        title="kiln",
        version="1",
        lifespan=_lifespan,
        responses=ERRORS,
        default_response_class=FiniteJSON,
    )
    app.add_middleware(BodyLimit)
    add_error_handlers(app)
    app.state.settings, app.state.store, app.state.executor = settings, store, executor
    app.state.confinement = confinement
    app.state.tokens = Tokens(settings.token, settings.read_token)
    app.include_router(health.router)  # open: the dashboard page and the health check
    for api in (configs, jobs, metrics, checkpoints):
        app.include_router(api.router, dependencies=[Depends(require_token)])
    return app
