"""The server's database: saved configs and jobs (SQLAlchemy; SQLite in WAL mode by default,
PostgreSQL by URL). The server is its only writer; a job's run directory stays the source of
truth for how the run went (status.json, metrics.jsonl, checkpoints)."""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import JSON, Float, Integer, String, Text, create_engine, event, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from kiln.runs import ACTIVE_STATES, END_STATES
from kiln.runs import STATES as RUN_STATES

__all__ = [
    "ACTIVE",
    "CLAIM_KEY",
    "END",
    "JOB_STATES",
    "QUEUED",
    "RESUMABLE",
    "RUNNING",
    "STATES",
    "VERSION_TABLE",
    "ConfigRow",
    "JobRow",
    "Store",
]

LOST = "lost"
"""The state `kiln.runs.run_state` gives a run whose process vanished without an end state."""
JOB_STATES: dict[str, str] = {
    **{state: state for state in RUN_STATES},
    "finished": "succeeded",
    LOST: LOST,
}
"""A run's state (status.json's, or `kiln.runs.run_state`'s "lost") -> its job's: the one
table between the two vocabularies. A job has one state more, "queued" (no run yet)."""
QUEUED = "queued"
STATES = (QUEUED, *JOB_STATES.values())
"""Every state of a job: queued, starting, running, paused, succeeded, failed, diverged,
stopped, lost."""
RUNNING = tuple(JOB_STATES[state] for state in ACTIVE_STATES)
"""States of a job whose attempt is expected to be alive (starting, running)."""
ACTIVE = (QUEUED, *RUNNING)
"""States of a job the server still has to follow."""
END = tuple(JOB_STATES[state] for state in END_STATES)
"""States a job takes from the end state its run recorded."""
RESUMABLE = ("paused", "stopped", "failed", LOST)
"""States from which a job may be resumed (a new attempt from its checkpoint)."""
VERSION_TABLE = "kiln_serve_alembic_version"
"""Where alembic keeps this schema's revision: not `alembic_version`, which Optuna and MLflow
use for theirs when they share the database (a sweep's study in the same PostgreSQL)."""
CLAIM_KEY = 0x6B696C6E5345  # "kilnSE": the PostgreSQL advisory lock a server holds


class Base(DeclarativeBase):
    pass


class ConfigRow(Base):
    __tablename__ = "configs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    created: Mapped[float] = mapped_column(Float)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "config": self.config, "created": self.created}


class JobRow(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    config_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    run_dir: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    resume: Mapped[bool] = mapped_column(Integer, default=0)
    """The next attempt continues from the run's checkpoint (`kiln train --resume`)."""
    nproc: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Ranks on the node that runs it (`kiln train --nproc`)."""
    handle: Mapped[str | None] = mapped_column(String(128), nullable=True)
    """The executor's name for the running attempt where it is not a local pid (a Ray Jobs
    submission id)."""
    pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    pid_start: Mapped[str | None] = mapped_column(String(32), nullable=True)
    """The process's start time (/proc/PID/stat): a reused pid is not the job's."""
    stop_requested: Mapped[float | None] = mapped_column(Float, nullable=True)
    exit_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created: Mapped[float] = mapped_column(Float)
    started: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended: Mapped[float | None] = mapped_column(Float, nullable=True)

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "id",
            "name",
            "config_id",
            "run_dir",
            "state",
            "attempt",
            "nproc",
            "pid",
            "handle",
            "exit_code",
            "error",
            "created",
            "started",
            "ended",
        )
        return {k: getattr(self, k) for k in keys}


def new_id() -> str:
    return uuid.uuid4().hex[:12]


class Store:
    """Configs and jobs in a database at `url` (tables created on first use)."""

    def __init__(self, url: str, claim: bool = False) -> None:
        """`claim`: first make this process the database's one server (`claim()`)."""
        self.engine = create_engine(url)
        if url.startswith("sqlite"):

            @event.listens_for(self.engine, "connect")
            def _wal(connection: Any, _: Any) -> None:  # readers never block the writer
                cursor = connection.cursor()
                cursor.execute("PRAGMA journal_mode=WAL")
                cursor.execute("PRAGMA busy_timeout=5000")
                cursor.close()

        if claim:
            self.claim()
        self.migrate()

    def migrate(self) -> str:
        """Bring the database's tables to the newest revision (alembic, in
        kiln/serve/migrations); the revision it is at."""
        logging.getLogger("alembic").setLevel(logging.WARNING)  # "setup plugin", "Running ..."
        from alembic import command
        from alembic.config import Config
        from alembic.runtime.migration import MigrationContext

        config = Config()
        config.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
        with self.engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
            return str(context.get_current_revision())

    def claim(self) -> None:
        """Make this process the database's one server, until it exits: two servers on one
        database would both start its queued jobs. SQLite: an flock on `<file>.lock` (which
        names the holder's pid); PostgreSQL: a session advisory lock. KilnError (one line)
        when another process holds it."""
        from kiln.errors import KilnError

        url = self.engine.url
        taken = f"{url.render_as_string(hide_password=True)}: another kiln serve uses this database"
        if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
            import fcntl

            path = Path(f"{url.database}.lock")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise KilnError(
                    f"{taken} (pid {holder}); stop it, or give this one its own --state-dir or --db"
                ) from None
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._claim: Any = fd  # held open: the lock lives as long as this process
        elif url.get_backend_name() == "postgresql":
            connection = self.engine.connect()
            query = text("SELECT pg_try_advisory_lock(:key)")
            if not connection.execute(query, {"key": CLAIM_KEY}).scalar():
                connection.close()
                raise KilnError(f"{taken}; stop it, or give this one its own --db")
            connection.commit()
            self._claim = connection

    @contextmanager
    def session(self) -> Iterator[Session]:
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            yield session

    # ---- configs -------------------------------------------------------------------------

    def add_config(self, name: str, config: dict[str, Any]) -> ConfigRow:
        row = ConfigRow(id=new_id(), name=name, config=config, created=time.time())
        with self.session() as s:
            s.add(row)
        return row

    def configs(self) -> list[ConfigRow]:
        with self.session() as s:
            return list(s.scalars(select(ConfigRow).order_by(ConfigRow.created)))

    def config(self, config_id: str) -> ConfigRow | None:
        with self.session() as s:
            return s.get(ConfigRow, config_id)

    def delete_config(self, config_id: str) -> bool:
        with self.session() as s:
            row = s.get(ConfigRow, config_id)
            if row is not None:
                s.delete(row)
            return row is not None

    # ---- jobs ----------------------------------------------------------------------------

    def add_job(self, job: JobRow) -> JobRow:
        with self.session() as s:
            s.add(job)
        return job

    def jobs(self, states: tuple[str, ...] | None = None) -> list[JobRow]:
        query = select(JobRow).order_by(JobRow.created)
        if states is not None:
            query = query.where(JobRow.state.in_(states))
        with self.session() as s:
            return list(s.scalars(query))

    def job(self, job_id: str) -> JobRow | None:
        with self.session() as s:
            return s.get(JobRow, job_id)

    def update_job(self, job_id: str, **values: Any) -> JobRow:
        with self.session() as s:
            row = s.get(JobRow, job_id)
            if row is None:
                raise KeyError(job_id)
            for key, value in values.items():
                setattr(row, key, value)
            return row
