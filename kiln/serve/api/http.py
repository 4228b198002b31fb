"""HTTP plumbing under the routers: JSON that stays JSON, the request-body limit, and the
error handlers that answer every problem as `{"detail": ...}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from kiln.files import finite_json

__all__ = ["MAX_BODY", "BodyLimit", "FiniteJSON", "add_error_handlers"]

MAX_BODY = 1 << 20
"""Largest request body (1 MiB; a run config is a few KiB): larger ones answer 413."""


class FiniteJSON(JSONResponse):
    """JSON that stays JSON: a NaN or infinity read from a run's files (metrics.jsonl written
    before they became null, a status.json) is sent as null, never a 500."""

    def render(self, content: Any) -> bytes:
        try:
            return super().render(content)
        except ValueError:  # out-of-range floats: Starlette dumps with allow_nan=False
            return super().render(finite_json(content))


class BodyLimit:
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


async def _problem(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)


async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
    """A bad request body or query: one line per problem, naming where, as the CLI does."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(x) for x in err.get("loc", ()) if x != "body")
        lines.append(f"{where}: {err.get('msg', 'invalid')}" if where else err.get("msg"))
    return JSONResponse({"detail": lines}, 422)


def add_error_handlers(app: FastAPI) -> None:
    """Every HTTPException and every invalid request answered as `{"detail": ...}`."""
    app.add_exception_handler(HTTPException, _problem)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
