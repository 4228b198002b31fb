"""The REST API (FastAPI): configs, jobs, metrics, checkpoints, a live event stream.

Routes are the contract of docs/serve.md (`/api/training/...`). Every request body is
validated; a run config is checked by `RunConfig` and a bad one answers 422 with the CLI's
one-line messages. With a token configured, every route but `/api/health` needs
`Authorization: Bearer <token>` (compared in constant time, never logged).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, Field

from kiln.errors import KilnError
from kiln.files import finite_json
from kiln.serve.confine import Confinement
from kiln.serve.executor import Executor, LocalExecutor, describe
from kiln.serve.store import JobRow, Store, new_id
from kiln.serve.views import checkpoint_dir, checkpoints, current, history, tar_stream, throughput

__all__ = ["Settings", "create_app"]


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


MAX_BODY = 1 << 20
"""Largest request body (1 MiB; a run config is a few KiB): larger ones answer 413."""
MAX_DEPTH = 32
"""Deepest nesting of a config's mappings and lists (a real one is under 6 deep)."""


def _shallow(config: dict[str, Any]) -> dict[str, Any]:
    """`config`, when no mapping or list in it is nested more than MAX_DEPTH deep (walked
    without recursion: a deeper one would exhaust the stack of whatever reads it next)."""
    stack: list[tuple[Any, int]] = [(config, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested more than {MAX_DEPTH} levels deep")
        children = node.values() if isinstance(node, dict) else node
        stack += [(c, depth + 1) for c in children if isinstance(c, dict | list)]
    return config


Config = Annotated[dict[str, Any], AfterValidator(_shallow)]


class ConfigIn(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    config: Config


class StartIn(BaseModel):
    config: Config | None = None
    config_id: str | None = None
    dataset_path: str | None = None
    name: str | None = Field(None, max_length=200)
    nproc: int = Field(
        1, ge=1, le=64, strict=True, description="ranks on one node (kiln train --nproc)"
    )


class Problem(BaseModel):
    detail: list[str] | str


_CODES = (400, 401, 403, 404, 409, 413, 422)
_ERRORS = {code: {"model": Problem} for code in _CODES}
_JSON_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {
        "description": "an error, as JSON",
        "content": {"application/json": {"schema": Problem.model_json_schema()}},
    }
    for code in _CODES
}
"""For routes whose success is not JSON (text, a stream, a file): their errors still are."""
_BYTES = {"description": "the file's bytes", "content": {"application/octet-stream": {}}}


def _checked(config: dict[str, Any], confinement: Confinement, run_dir: Path) -> dict[str, Any]:
    """`config` validated as `kiln train` would, then confined (kiln/serve/confine.py): what a
    job at `run_dir` runs, every path in it absolute. 422 with one line per problem."""
    from kiln.config import load_config

    try:
        load_config(data=config)
        confined = confinement.confine(config, run_dir)
        load_config(data=confined)
    except KilnError as exc:
        raise HTTPException(422, str(exc).splitlines()) from None
    return confined


class _Json(JSONResponse):
    """JSON that stays JSON: a NaN or infinity read from a run's files (metrics.jsonl written
    before they became null, a status.json) is sent as null, never a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # out-of-range floats: Starlette dumps with allow_nan=False
            return super().render(finite_json(content))


class _BodyLimit:
    """Refuses a request body over `limit` bytes with 413 before the app reads it, whether
    it declares its length or is sent in chunks (then it is read up to the limit and
    replayed to the app)."""

    def __init__(self, app: Any, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(send, 413 if declared.isdigit() else 400)
        messages, size = [], 0
        if scope["method"] not in ("GET", "HEAD"):
            while True:
                message = await receive()
                messages.append(message)
                size += len(message.get("body", b""))
                if size > self.limit:
                    return await self._refuse(send, 413)
                if message["type"] != "http.request" or not message.get("more_body"):
                    break

        async def replay() -> Any:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Any, status: int) -> None:
        detail = (
            f"the request body is over {self.limit} bytes"
            if status == 413
            else "Content-Length is not a number"
        )
        await JSONResponse({"detail": detail}, status)({"type": "http"}, None, send)


def make_executor(settings: Settings, store: Store) -> Executor:
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


def create_app(settings: Settings) -> FastAPI:
    """The app, its store and its executor (started with the app, stopped with it)."""
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    confinement = Confinement(settings.state_dir, settings.allow_read, settings.allow_hub)
    store = Store(settings.url, claim=settings.claim)
    executor = make_executor(settings, store)
    digests = {
        scope: hashlib.sha256(token.encode()).digest()
        for scope, token in (("write", settings.token), ("read", settings.read_token))
        if token is not None
    }

    def auth(request: Request) -> None:
        if not digests:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(token.encode()).digest()
        scopes = {s for s, d in digests.items() if hmac.compare_digest(given, d)}
        if scheme.lower() != "bearer" or not scopes:
            raise HTTPException(401, "a bearer token is required", {"WWW-Authenticate": "Bearer"})
        if "write" not in scopes and request.method not in ("GET", "HEAD"):
            raise HTTPException(403, "this token has the read scope only")

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> Any:
        if not settings.dry_run:
            executor.start()
        yield
        executor.close()

    app = FastAPI(
        title="kiln",
        version="1",
        lifespan=lifespan,
        responses=_ERRORS,
        default_response_class=_Json,
    )
    app.add_middleware(_BodyLimit)
    app.state.store, app.state.executor = store, executor
    guarded = [Depends(auth)]
    unstarted = settings.state_dir / "runs" / "unstarted"  # a saved config has no job yet

    def job_or_404(job_id: str) -> JobRow:
        job = store.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        """The dashboard: one static page that reads this API (docs/serve.md)."""
        return FileResponse(Path(__file__).parent / "static" / "index.html")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"ok": True, "jobs": len(store.jobs(("starting", "running")))}

    # ---- configs -------------------------------------------------------------------------

    @app.post("/api/training/configs", status_code=201, dependencies=guarded)
    def add_config(body: ConfigIn) -> dict[str, Any]:
        _checked(body.config, confinement, unstarted)  # saved as given, confined at start
        return store.add_config(body.name, body.config).to_dict()

    @app.post("/api/training/configs/explain", dependencies=guarded)
    def explain_config(body: ConfigIn) -> dict[str, Any]:
        """What the config implies (`kiln config explain`), before it is started."""
        from kiln.config import load_config
        from kiln.errors import KilnError
        from kiln.explain import explain, explain_facts

        cfg = load_config(data=_checked(body.config, confinement, unstarted))
        try:  # epochs are counted on the data: a data file can still be wrong
            return {**explain_facts(cfg), "text": explain(cfg)}
        except KilnError as exc:
            raise HTTPException(422, str(exc).splitlines()) from None

    @app.get("/api/training/configs", dependencies=guarded)
    def list_configs() -> list[dict[str, Any]]:
        return [c.to_dict() for c in store.configs()]

    @app.get("/api/training/configs/{config_id}", dependencies=guarded)
    def get_config(config_id: str) -> dict[str, Any]:
        row = store.config(config_id)
        if row is None:
            raise HTTPException(404, f"no config {config_id}")
        return row.to_dict()

    @app.delete("/api/training/configs/{config_id}", status_code=204, dependencies=guarded)
    def delete_config(config_id: str) -> None:
        if not store.delete_config(config_id):
            raise HTTPException(404, f"no config {config_id}")

    # ---- jobs ----------------------------------------------------------------------------

    @app.post("/api/training/jobs/start", status_code=201, dependencies=guarded)
    def start_job(body: StartIn) -> dict[str, Any]:
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
        job_id = new_id()
        run_dir = settings.state_dir / "runs" / job_id
        config = _checked(config, confinement, run_dir)
        job = JobRow(
            id=job_id,
            name=name or str(config.get("name") or job_id),
            config=config,
            config_id=body.config_id,
            run_dir=str(run_dir),
            state="queued",
            attempt=0,
            resume=False,
            nproc=body.nproc,
            created=time.time(),
        )
        return describe(store.add_job(job))

    @app.get("/api/training/jobs", dependencies=guarded)
    def list_jobs() -> list[dict[str, Any]]:
        return [describe(j) for j in store.jobs()]

    @app.get("/api/training/jobs/{job_id}/status", dependencies=guarded)
    def job_status(job_id: str) -> dict[str, Any]:
        return describe(job_or_404(job_id))

    @app.post("/api/training/jobs/{job_id}/stop", status_code=202, dependencies=guarded)
    def stop_job(job_id: str) -> dict[str, Any]:
        return describe(executor.stop(job_or_404(job_id)))

    @app.post("/api/training/jobs/{job_id}/resume", status_code=202, dependencies=guarded)
    def resume_job(job_id: str) -> dict[str, Any]:
        job = job_or_404(job_id)
        if job.state not in ("paused", "stopped", "failed", "lost"):
            raise HTTPException(
                409,
                f"job {job_id} is {job.state}: only a paused, stopped, failed or lost job resumes",
            )
        if not any(Path(job.run_dir, "checkpoints").glob("step-*")):
            raise HTTPException(409, f"job {job_id} has no checkpoint to resume from")
        return describe(executor.resume(job))

    @app.get(
        "/api/training/jobs/{job_id}/logs",
        dependencies=guarded,
        response_class=PlainTextResponse,
        responses=_JSON_ERRORS,
    )
    def job_logs(job_id: str, tail: int = Query(200, ge=1, le=100_000)) -> PlainTextResponse:
        lines = executor.logs(job_or_404(job_id))
        return PlainTextResponse("\n".join(lines[-tail:]) + ("\n" if lines else ""))

    # ---- metrics -------------------------------------------------------------------------

    @app.get("/api/training/jobs/{job_id}/metrics", dependencies=guarded)
    def job_metrics(job_id: str) -> dict[str, Any]:
        return current(job_or_404(job_id).run_dir)

    @app.get("/api/training/jobs/{job_id}/metrics/history", dependencies=guarded)
    def job_history(
        job_id: str,
        since_step: int | None = Query(None, ge=0),
        until_step: int | None = Query(None, ge=0),
        max_points: int = Query(1000, ge=2, le=100_000),
    ) -> dict[str, Any]:
        return history(job_or_404(job_id).run_dir, since_step, until_step, max_points)

    @app.get("/api/training/jobs/{job_id}/throughput", dependencies=guarded)
    def job_throughput(job_id: str) -> dict[str, Any]:
        return throughput(job_or_404(job_id).run_dir)

    @app.get(
        "/api/training/jobs/{job_id}/events",
        dependencies=guarded,
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, **_JSON_ERRORS},
    )
    async def job_events(job_id: str, request: Request) -> StreamingResponse:
        """Server-Sent Events: `metrics` (id = step), `checkpoint` as each complete checkpoint
        (and final/) lands, `status` on each change of state, `end` when the job ends.
        Resumable: records and checkpoints after step `Last-Event-ID` are sent first."""
        job = job_or_404(job_id)
        given = request.headers.get("last-event-id", "").strip()
        try:  # the step of the last event seen (metrics ids are steps)
            after = int(given) if given else -1
        except ValueError:
            raise HTTPException(
                400, f"Last-Event-ID: expected a step number (an integer), got {given[:40]!r}"
            ) from None
        return StreamingResponse(
            _events(store, job, after, request), media_type="text/event-stream"
        )

    # ---- checkpoints ---------------------------------------------------------------------

    @app.get("/api/training/jobs/{job_id}/checkpoints", dependencies=guarded)
    def job_checkpoints(job_id: str) -> list[dict[str, Any]]:
        job = job_or_404(job_id)
        metric = ((job.config.get("checkpoint") or {}).get("metric")) or "val_loss"
        found = checkpoints(job.run_dir, metric)
        return [{**c, "id": f"{job.id}.{c['id']}"} for c in found]

    def checkpoint_or_404(checkpoint_id: str) -> Path:
        job_id, _, name = checkpoint_id.partition(".")
        where = checkpoint_dir(job_or_404(job_id).run_dir, name)
        if where is None:
            raise HTTPException(404, f"no complete checkpoint {checkpoint_id}")
        return where

    @app.get(
        "/api/training/checkpoints/{checkpoint_id}/download",
        dependencies=guarded,
        response_class=StreamingResponse,
        responses={200: {"content": {"application/x-tar": {}}}, **_JSON_ERRORS},
    )
    def download(checkpoint_id: str) -> StreamingResponse:
        where = checkpoint_or_404(checkpoint_id)
        headers = {"Content-Disposition": f'attachment; filename="{checkpoint_id}.tar"'}
        return StreamingResponse(tar_stream(where), media_type="application/x-tar", headers=headers)

    @app.get(
        "/api/training/checkpoints/{checkpoint_id}/files/{name:path}",
        dependencies=guarded,
        response_class=FileResponse,
        responses={200: _BYTES, 206: _BYTES, **_JSON_ERRORS},
    )
    def checkpoint_file(checkpoint_id: str, name: str) -> FileResponse:
        where = checkpoint_or_404(checkpoint_id)
        path = (where / name).resolve()
        if not path.is_file() or where.resolve() not in path.parents:
            raise HTTPException(404, f"no file {name} in {checkpoint_id}")
        return FileResponse(path)  # HTTP Range: 206 with the bytes asked for

    @app.exception_handler(HTTPException)
    async def problem(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        """A bad request body or query: one line per problem, naming where, as the CLI does."""
        lines = []
        for err in exc.errors():
            where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
            lines.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
        return JSONResponse({"detail": lines}, 422)

    return app


def _new_checkpoints(job: JobRow, after: int, seen: set[str]) -> list[dict[str, Any]]:
    """Complete checkpoints (and final/) of the job past step `after` not in `seen` (which
    gains them), as the checkpoints route lists them."""
    metric = ((job.config.get("checkpoint") or {}).get("metric")) or "val_loss"
    found = []
    for c in checkpoints(job.run_dir, metric):
        if c["id"] not in seen and (c["final"] or (c["step"] or 0) > after):
            seen.add(c["id"])
            found.append({**c, "id": f"{job.id}.{c['id']}"})
    return found


async def _events(store: Store, job: JobRow, after: int, request: Request) -> Any:
    from kiln.runs import read_metrics

    offset, state = 0, None
    seen: set[str] = set()
    folder, stamp = Path(job.run_dir), None  # the run dir changes when a checkpoint lands
    while True:
        records, offset = read_metrics(job.run_dir, offset)
        for r in records:  # each record once (a rewrite after a resume repeats its steps)
            if r["step"] > after:
                yield f"id: {r['step']}\nevent: metrics\ndata: {json.dumps(finite_json(r))}\n\n"
        now_stamp = [_mtime(folder / "checkpoints"), _mtime(folder / "final")]
        if now_stamp != stamp:
            stamp = now_stamp
            for c in _new_checkpoints(job, after, seen):  # no id: metrics ids stay the resume point
                yield f"event: checkpoint\ndata: {json.dumps(c)}\n\n"
        now = store.job(job.id)
        if now is not None and now.state != state:
            state = now.state
            yield f"event: status\ndata: {json.dumps(describe(now))}\n\n"
            if state not in ("queued", "starting", "running"):
                yield f"event: end\ndata: {json.dumps({'state': state})}\n\n"
                return
        if await request.is_disconnected():
            return
        await asyncio.sleep(0.5)


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None
