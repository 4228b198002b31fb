"""Fixtures and collection hooks; shared helpers live in `helpers.py`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import make_rows, write_jsonl


@pytest.fixture
def recipe_files(tmp_path: Path) -> tuple[Path, Path]:
    train = write_jsonl(tmp_path / "train.jsonl", make_rows(120, seed=1))
    val = write_jsonl(tmp_path / "val.jsonl", make_rows(20, seed=2))
    return train, val


RANKS = {
    "test_distributed",
    "test_distributed_failures",
    "test_elastic",
    "test_rank",
    "test_kill",
    "test_job",
    "test_serve_cluster",
}
"""Modules that start ranks or kill runs and time them: under pytest-xdist (`make test`:
`-n 2 --dist loadgroup`) they run one after another on one worker, never two at once."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU-marked tests run only where CUDA is available. xdist groups: the RANKS modules
    together, every other module on its own (its module-scoped fixtures are built once)."""
    import torch

    for item in items:
        module = item.module.__name__.rpartition(".")[2] if item.module is not None else ""
        item.add_marker(pytest.mark.xdist_group("ranks" if module in RANKS else module))
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Any:
    """A PostgreSQL server from this machine's binaries, on loopback, for the test's life."""
    import shutil
    import tempfile

    from helpers import free_port

    initdb, pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
    if initdb is None or pg_ctl is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not on this machine")
    pytest.importorskip("psycopg")
    root = Path(tempfile.mkdtemp(prefix="kiln-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        import pwd

        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    data = root / "data"
    subprocess.run(
        [*as_user, initdb, "-D", str(data), "-U", "kiln", "--auth=trust"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [*as_user, pg_ctl, "-D", str(data), "-o", options, "-l", str(root / "log"), "-w", "start"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        yield f"postgresql+psycopg://kiln@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An SQLAlchemy URL: a fresh SQLite file, or the session's PostgreSQL server."""
    if request.param == "postgresql":
        return request.getfixturevalue("postgres")
    return f"sqlite:///{tmp_path / 'db.sqlite'}"
