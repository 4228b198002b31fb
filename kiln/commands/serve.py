"""`kiln serve`: the REST API and live event stream over jobs that are `kiln train`
subprocesses (docs/serve.md). Jobs outlive the server: stop it, start it again, and it finds
them (or what they recorded) in their run directories."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import socket
from pathlib import Path
from typing import Any

HELP = "serve the REST API for configs, jobs, metrics and checkpoints"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    p.add_argument("--port", type=int, default=8080, help="port (8080)")
    p.add_argument(
        "--token",
        default=None,
        help="bearer token every route but /api/health needs; default "
        "$KILN_SERVE_TOKEN; required to bind a non-loopback address",
    )
    read = "bearer token for GET requests only; default $KILN_SERVE_READ_TOKEN"
    p.add_argument("--read-token", default=None, help=read)
    reindex = "first add to the database every job found in <state-dir>/runs"
    p.add_argument("--reindex", action="store_true", help=reindex)
    p.add_argument("--db", metavar="URL", help="SQLAlchemy URL (default SQLite in --state-dir)")
    p.add_argument(
        "--state-dir",
        default="serve",
        metavar="DIR",
        help="the database and the jobs' run directories (./serve)",
    )
    p.add_argument(
        "--max-concurrent", type=int, default=1, metavar="N", help="jobs running at once (1)"
    )
    p.add_argument(
        "--executor",
        choices=("local", "ray"),
        default="local",
        help="where jobs run: subprocesses here (local) or Ray Jobs (ray)",
    )
    p.add_argument(
        "--ray-address",
        metavar="URL",
        help="the Ray dashboard for --executor ray (http://HEAD:8265); default "
        "$RAY_API_SERVER_ADDRESS or $RAY_ADDRESS",
    )
    p.add_argument(
        "--gpus-per-rank",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs a Ray job asks for per rank (0)",
    )
    p.add_argument(
        "--allow-read",
        action="append",
        default=[],
        metavar="DIR",
        help="jobs may also read data, models and tokenizers under DIR (repeatable); "
        "by default only under --state-dir",
    )
    p.add_argument(
        "--allow-hub",
        action="store_true",
        help="jobs may name hub datasets (hf:NAME) and hub model ids",
    )


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    from kiln.errors import KilnError
    from kiln.registry import require_extra

    token = args.token or os.environ.get("KILN_SERVE_TOKEN") or None
    if not _loopback(args.host) and token is None:
        raise KilnError(
            f"--host {args.host}: a non-loopback address needs --token (or $KILN_SERVE_TOKEN)"
        )
    if args.max_concurrent < 1:
        raise KilnError(f"--max-concurrent: at least 1, got {args.max_concurrent}")
    # The serve extra (alembic too, imported by the store once its logger is quieted: its
    # import logs a line per plug-in).
    for module in ("fastapi", "uvicorn", "sqlalchemy"):
        require_extra(module, "serve", feature="kiln serve")
    import uvicorn

    from kiln.serve.app import Settings

    if args.gpus_per_rank < 0:
        raise KilnError(f"--gpus-per-rank: at least 0, got {args.gpus_per_rank}")
    ray_address = None
    if args.executor == "ray":
        ray_address = (
            args.ray_address
            or os.environ.get("RAY_API_SERVER_ADDRESS")
            or os.environ.get("RAY_ADDRESS")
        )
        if not ray_address:
            raise KilnError(
                "--executor ray: give --ray-address http://HEAD:8265 (or $RAY_API_SERVER_ADDRESS)"
            )
    elif args.ray_address or args.gpus_per_rank:
        raise KilnError("--ray-address/--gpus-per-rank: only with --executor ray")
    read_token = args.read_token or os.environ.get("KILN_SERVE_READ_TOKEN") or None
    state_dir = _state_dir(args.state_dir)
    allow_read = tuple(_readable_root(d) for d in args.allow_read)
    settings = Settings(
        state_dir,
        args.db,
        token,
        read_token,
        args.max_concurrent,
        executor=args.executor,
        ray_address=ray_address,
        gpus_per_rank=args.gpus_per_rank,
        claim=True,
        allow_read=allow_read,
        allow_hub=args.allow_hub,
    )
    sock = _bind(args.host, args.port)  # before the database is claimed: a taken port is early
    try:
        app = _app(settings, args.db)
    except BaseException:
        sock.close()
        raise
    if args.reindex:
        from kiln.serve.executor import reindex

        added = reindex(app.state.store, settings.state_dir / "runs")
        print(f"kiln serve: reindexed {len(added)} jobs from {settings.state_dir / 'runs'}")
    port = sock.getsockname()[1]
    print(f"kiln serve: http://{args.host}:{port} (state {settings.state_dir})", flush=True)
    # access_log off: request lines would carry query strings; tokens travel in headers only.
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def _state_dir(given: str) -> Path:
    """--state-dir, created; KilnError (one line) when it cannot be a writable directory."""
    from kiln.errors import KilnError

    path = Path(given)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise KilnError(f"--state-dir {given}: is a file, not a directory") from None
    except OSError as exc:
        raise KilnError(f"--state-dir {given}: cannot create it: {exc.strerror}") from None
    if not path.is_dir():
        raise KilnError(f"--state-dir {given}: is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise KilnError(f"--state-dir {given}: not writable by this user")
    return path


def _readable_root(given: str) -> Path:
    from kiln.errors import KilnError

    if not Path(given).is_dir():
        raise KilnError(f"--allow-read {given}: no such directory")
    return Path(given)


def _bind(host: str, port: int) -> socket.socket:
    """The listening socket at host:port; KilnError (one line) when it cannot be had (in
    use, not an address of this machine, a port out of range)."""
    from kiln.errors import KilnError

    if not 0 <= port <= 65535:
        raise KilnError(f"--port: 0 to 65535, got {port}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT ok
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        reason = "in use by another process" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise KilnError(f"--host {host} --port {port}: cannot listen there: {reason}") from None
    sock.set_inheritable(True)
    return sock


def _app(settings: Any, db: str | None) -> Any:
    """create_app, with a database that cannot be opened (an unknown or uninstalled driver,
    a server that does not answer, a file that cannot be written) as one line."""
    from sqlalchemy.exc import SQLAlchemyError

    from kiln.errors import KilnError, first_line
    from kiln.serve.app import create_app

    where = f"--db {_shown(db)}" if db else f"--state-dir {settings.state_dir}"
    try:
        return create_app(settings)
    except ImportError as exc:  # the URL's driver (psycopg2, MySQLdb) is not installed
        raise KilnError(
            f"{where}: its database driver is not installed ({exc.name or exc})"
        ) from None
    except (SQLAlchemyError, OSError) as exc:
        raise KilnError(f"{where}: cannot open the database: {first_line(exc)}") from None


def _shown(url: str) -> str:
    """The URL without its password (it may stand in a log)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return "(not a database URL)"
