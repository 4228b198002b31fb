"""`kiln serve`: the REST API and live event stream over jobs that are `kiln train`
subprocesses (docs/serve.md). Jobs outlive the server: stop it, start it again, and it finds
them (or what they recorded) in their run directories."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

HELP = "serve the REST API for configs, jobs, metrics and checkpoints"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (8080)")
    p.add_argument("--token", default=None,
                   help="bearer token every route but /api/health needs; default "
                        "$KILN_SERVE_TOKEN; required to bind a non-loopback address")  # fmt: skip
    read = "bearer token for GET requests only; default $KILN_SERVE_READ_TOKEN"
    p.add_argument("--read-token", default=None, help=read)
    reindex = "first add to the database every job found in <state-dir>/runs"
    p.add_argument("--reindex", action="store_true", help=reindex)
    p.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default SQLite in --state-dir)")
    p.add_argument("--state-dir", default="serve", metavar="DIR",
                   help="the database and the jobs' run directories (./serve)")  # fmt: skip
    p.add_argument("--max-concurrent", type=int, default=1, metavar="N",
                   help="jobs running at once (1)")  # fmt: skip
    p.add_argument("--executor", choices=("local", "ray"), default="local",
                   help="where jobs run: subprocesses here (local) or Ray Jobs (ray)")  # fmt: skip
    p.add_argument("--ray-address", metavar="URL",
                   help="the Ray dashboard for --executor ray (http://HEAD:8265); default "
                        "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS")  # fmt: skip
    p.add_argument("--gpus-per-rank", type=float, default=0.0, metavar="G",
                   help="GPUs a Ray job asks for per rank (0)")  # fmt: skip


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from kiln.errors import KilnError

    token = args.token or os.environ.get("KILN_SERVE_TOKEN") or None
    if not _loopback(args.host) and token is None:
        raise KilnError(f"--host {args.host}: a non-loopback address needs --token (or "
                        "$KILN_SERVE_TOKEN)")  # fmt: skip
    if args.max_concurrent < 1:
        raise KilnError(f"--max-concurrent: at least 1, got {args.max_concurrent}")
    try:
        import uvicorn

        from kiln.serve.app import Settings, create_app
    except ImportError as exc:
        raise KilnError(f"kiln serve needs fastapi and uvicorn ({exc.name} is missing): "
                        "pip install 'kiln[serve]'") from None  # fmt: skip
    if args.gpus_per_rank < 0:
        raise KilnError(f"--gpus-per-rank: at least 0, got {args.gpus_per_rank}")
    ray_address = None
    if args.executor == "ray":
        ray_address = (args.ray_address or os.environ.get("RAY_API_SERVER_ADDRESS")
                       or os.environ.get("RAY_ADDRESS"))  # fmt: skip
        if not ray_address:
            raise KilnError("--executor ray: give --ray-address http://HEAD:8265 (or "
                            "$RAY_API_SERVER_ADDRESS)")  # fmt: skip
    elif args.ray_address or args.gpus_per_rank:
        raise KilnError("--ray-address/--gpus-per-rank: only with --executor ray")
    read_token = args.read_token or os.environ.get("KILN_SERVE_READ_TOKEN") or None
    settings = Settings(Path(args.state_dir), args.db, token, read_token, args.max_concurrent,
                        executor=args.executor, ray_address=ray_address,
                        gpus_per_rank=args.gpus_per_rank, claim=True)  # fmt: skip
    app = create_app(settings)
    if args.reindex:
        from kiln.serve.executor import reindex

        added = reindex(app.state.store, settings.state_dir / "runs")
        print(f"kiln serve: reindexed {len(added)} jobs from {settings.state_dir / 'runs'}")
    print(f"kiln serve: http://{args.host}:{args.port} (state {settings.state_dir})", flush=True)
    # access_log off: request lines would carry query strings; tokens travel in headers only.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0
