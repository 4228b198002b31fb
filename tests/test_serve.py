"""`kiln serve`: a real server (uvicorn on 127.0.0.1) running real tiny jobs through the
client; the run directories stay the source of truth."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from serve_helpers import ROOT, TOKEN, Server, losses, serve_config

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path: Path) -> Any:
    srv = Server(tmp_path / "state", "--max-concurrent", "1")
    yield srv
    srv.close()


def test_jobs_start_queue_stop_resume_and_finish_as_an_uninterrupted_run(
    tmp_path: Path, server: Server
) -> None:
    from kiln.client import ApiError, Client

    api = Client(server.url, token=TOKEN)
    raw = serve_config(tmp_path)
    saved = api.add_config("tiny", raw)
    assert api.config(saved["id"])["config"] == raw
    with pytest.raises(ApiError) as bad:  # validated as kiln train would, one line a problem
        api.add_config("bad", {**raw, "train": {**raw["train"], "batch_size": 0}})
    assert bad.value.status == 422
    assert bad.value.detail == ["train.batch_size: input should be greater than 0 (got 0)"]

    paused = api.start(config_id=saved["id"])
    reference = api.start(config=raw, name="reference")  # waits: --max-concurrent 1
    assert (paused["state"], reference["state"]) == ("queued", "queued")
    api.wait(paused["id"], until=lambda j: j["state"] == "running" and (j["step"] or 0) >= 5)
    assert api.status(reference["id"])["state"] == "queued"
    api.stop(paused["id"])
    job = api.wait(paused["id"], "paused", "failed", "succeeded")
    assert (job["state"], job["exit_code"]) == ("paused", 3), api.logs(paused["id"])
    step = job["step"]
    assert 5 <= step < 16

    # Checkpoints: listed with their manifest's checksum; the archive's files match it.
    listed = api.checkpoints(paused["id"])
    assert listed
    assert listed[-1]["id"] == f"{paused['id']}.step-{step}"
    with tarfile.open(fileobj=io.BytesIO(api.download(listed[-1]["id"]))) as archive:
        files = {
            m.name.split("/", 1)[1]: archive.extractfile(m).read() for m in archive if m.isfile()
        }
    manifest = json.loads(files["manifest.json"])
    assert hashlib.sha256(files["manifest.json"]).hexdigest() == listed[-1]["manifest_sha256"]
    for name, meta in manifest["files"].items():  # CRC-32 of each piece, as resume checks
        data, piece = files[name], meta["piece"]
        assert len(data) == meta["size"]
        crcs = [f"{zlib.crc32(data[i : i + piece]):08x}" for i in range(0, len(data), piece)]
        assert crcs == meta["crc32"], name
    ranged = api.http.get(
        f"/api/training/checkpoints/{listed[-1]['id']}/files/model.safetensors",
        headers={"Range": "bytes=10-99"},
    )
    assert ranged.status_code == 206
    assert ranged.content == files["model.safetensors"][10:100]

    api.wait(reference["id"], "running", "succeeded")  # the queue moved on
    api.resume(paused["id"])
    live = list(api.events(paused["id"], last_event_id=step))  # followed until the end
    done = api.status(paused["id"])
    assert done["state"] == "succeeded", api.logs(paused["id"])
    landed = [e["data"] for e in live if e["event"] == "checkpoint"]  # as each one landed
    assert [c["id"] for c in landed][-2:] == [f"{paused['id']}.step-16", f"{paused['id']}.final"]
    seen = [c["step"] for c in landed[:-1]]  # those not rotated away before the stream looked
    assert seen == sorted(set(seen))
    assert all(s > step and s % 2 == 0 for s in seen)
    assert all("id" not in e for e in live if e["event"] == "checkpoint")  # metrics ids resume
    ref = api.wait(reference["id"], "succeeded", "failed", timeout_s=300)
    assert ref["state"] == "succeeded"
    assert done["attempt"] == 2
    assert losses(done["run_dir"]) == losses(ref["run_dir"])  # bit-exact, as a CLI resume

    # The stream: every train step once, then the end; resumable after an event id.
    events = list(api.events(reference["id"]))
    steps = [
        e["data"]["step"]
        for e in events
        if e["event"] == "metrics" and e["data"]["split"] == "train"
    ]
    assert steps == list(range(1, 17))
    assert events[-1] == {"event": "end", "data": {"state": "succeeded"}}
    later = list(api.events(reference["id"], last_event_id=12))
    assert sorted({e["data"]["step"] for e in later if e["event"] == "metrics"}) == [13, 14, 15, 16]
    rid = reference["id"]  # the checkpoints still there (keep_last 2) past step 12, and final/
    kept = [e["data"]["id"] for e in later if e["event"] == "checkpoint"]
    assert kept == [f"{rid}.step-14", f"{rid}.step-16", f"{rid}.final"]
    history = api.history(reference["id"], max_points=4)
    assert len(history["train"]) <= 4
    series = losses(ref["run_dir"])
    kept = [r["loss"] for r in history["train"]]
    assert min(series) in kept
    assert max(series) in kept
    assert api.throughput(reference["id"])["step"] == 16

    # Auth: nothing but health without the token; the token in no log.
    import httpx

    assert httpx.get(f"{server.url}/api/health").status_code == 200
    assert httpx.get(f"{server.url}/api/training/jobs").status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert httpx.get(f"{server.url}/api/training/jobs", headers=wrong).status_code == 401
    server.close()
    logs = [server.log, *Path(tmp_path / "state" / "runs").glob("*.log")]
    assert not any(TOKEN in p.read_text() for p in logs)


def test_a_job_outlives_the_server(tmp_path: Path) -> None:
    """SIGKILL the server while a job runs; the restarted server still tracks the job, which
    finishes; nothing is orphaned or run twice."""
    from kiln.client import Client

    raw = serve_config(tmp_path)
    raw["train"]["max_steps"] = 24
    first = Server(tmp_path / "state")
    api = Client(first.url, token=TOKEN)
    job = api.start(config=raw)
    api.wait(job["id"], until=lambda j: j["state"] == "running" and (j["step"] or 0) >= 2)
    pid = api.status(job["id"])["pid"]
    os.kill(pid, signal.SIGSTOP)  # the job holds still while the server is away
    first.proc.kill()
    first.proc.wait()
    second = Server(tmp_path / "state")
    try:
        api = Client(second.url, token=TOKEN)
        now = api.status(job["id"])
        assert (now["state"], now["pid"]) == ("running", pid)  # found again, not restarted
        os.kill(pid, signal.SIGCONT)
        done = api.wait(job["id"], "succeeded", "failed", "lost", timeout_s=300)
        assert done["state"] == "succeeded"
        assert done["attempt"] == 1
        assert len(losses(done["run_dir"])) == 24
    finally:
        second.close()


def test_the_store_keeps_configs_and_jobs(database_url: str) -> None:
    from kiln.serve.store import JobRow, Store

    url = database_url
    store = Store(url)
    assert store.migrate() == "0002"  # the tables come from the migrations, applied once
    a = store.add_config("a", {"name": "a", "train": {"max_steps": 3}})
    b = store.add_config("b", {"name": "b"})
    assert [c.id for c in Store(url).configs()][-2:] == [a.id, b.id]  # another connection
    assert store.config(a.id).config == {"name": "a", "train": {"max_steps": 3}}
    assert store.delete_config(a.id) is True
    assert store.delete_config(a.id) is False
    assert store.config(a.id) is None
    job = store.add_job(
        JobRow(
            id=f"j{url[:6]}",
            name="j",
            config={},
            run_dir="/r",
            state="queued",
            attempt=0,
            resume=False,
            created=time.time(),
        )
    )
    store.update_job(job.id, state="running", pid=123, pid_start="42")
    assert [j.id for j in store.jobs(("running",))] == [job.id]
    assert store.job(job.id).to_dict()["pid"] == 123
    assert store.job(job.id).nproc == 1
    store.delete_config(b.id)


def test_a_database_of_the_first_schema_is_migrated_with_its_jobs(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import create_engine, text

    from kiln.serve.store import Store

    url = f"sqlite:///{tmp_path / 'old.db'}"
    config = Config()
    config.set_main_option("script_location", str(ROOT / "kiln" / "serve" / "migrations"))
    with create_engine(url).begin() as connection:  # a server of revision 0001 made it
        config.attributes["connection"] = connection
        command.upgrade(config, "0001")
        connection.execute(
            text(
                "INSERT INTO jobs (id, name, config, run_dir, state, attempt, resume, pid, created)"
                " VALUES ('old', 'old', '{}', '/r', 'running', 1, 0, 77, 1.0)"
            )
        )
    store = Store(url)
    assert store.migrate() == "0002"
    old = store.job("old")
    assert (old.state, old.pid, old.nproc, old.handle) == ("running", 77, 1, None)


def test_tokens_have_scopes_and_reindex_finds_jobs(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from kiln.serve.app import Settings, create_app
    from kiln.serve.executor import reindex

    runs = tmp_path / "state" / "runs"
    (runs / "abc123").mkdir(parents=True)
    (runs / "abc123.yaml").write_text("name: found\noutput_dir: x\n")
    status = {"format": 1, "state": "finished", "exit_code": 0, "step": 7, "started_at": 1.0}
    (runs / "abc123" / "status.json").write_text(json.dumps(status))
    app = create_app(
        Settings(tmp_path / "state", token="w", read_token="r", allow_read=(tmp_path,))
    )
    assert reindex(app.state.store, runs) == ["abc123"]
    assert reindex(app.state.store, runs) == []  # known now
    http = TestClient(app)
    assert http.get("/api/training/jobs").status_code == 401
    read, write = {"Authorization": "Bearer r"}, {"Authorization": "Bearer w"}
    [job] = http.get("/api/training/jobs", headers=read).json()
    assert (job["id"], job["name"], job["state"], job["step"]) == (
        "abc123",
        "found",
        "succeeded",
        7,
    )
    body = {"name": "x", "config": serve_config(tmp_path)}
    refused = http.post("/api/training/configs", json=body, headers=read)
    assert (refused.status_code, refused.json()) == (
        403,
        {"detail": "this token has the read scope only"},
    )
    assert http.post("/api/training/configs", json=body, headers=write).status_code == 201
    assert http.get("/api/training/jobs/nope/status", headers=read).status_code == 404
    schema = http.get("/openapi.json").json()
    responses = schema["paths"]["/api/training/jobs/{job_id}/resume"]["post"]["responses"]
    assert {"401", "403", "404", "409", "422"} <= set(responses)


def _chromium() -> str:
    """Debian's chromium, installed with apt-get when missing (a clear skip if that fails)."""
    import shutil

    found = shutil.which("chromium")
    if found is None and shutil.which("apt-get") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "chromium"]
        for cmd in (install, ["apt-get", "update", "-q"], install):
            subprocess.run(cmd, env=env, capture_output=True, timeout=900)
            if found := shutil.which("chromium"):
                break
    if found is None:
        pytest.skip("Debian's chromium is not installed and apt-get could not install it")
    return found


def test_the_dashboard_shows_a_finished_jobs_curve(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from kiln.client import Client

    browser = _chromium()
    srv = Server(tmp_path / "state", "--token", "")  # no token: the page is opened as is
    try:
        api = Client(srv.url)
        raw = serve_config(tmp_path)
        raw["train"]["max_steps"] = 8
        job = api.start(config=raw)
        done = api.wait(job["id"], "succeeded", "failed")
        assert done["state"] == "succeeded"
        # As an elastic run records a node that left (kiln.engine.elastic): the page says so.
        status_file = Path(done["run_dir"]) / "status.json"
        status = json.loads(status_file.read_text())
        change = {"step": 4, "from": 2, "to": 1, "reason": "node left", "time": 0.0}
        status_file.write_text(json.dumps({**status, "world_size_changes": [change]}))
        page = f"{srv.url}/#job/{job['id']}"
        base = [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--window-size=1200,900",
            "--virtual-time-budget=8000",
        ]
        dom = subprocess.run(
            [*base, "--dump-dom", page], capture_output=True, text=True, timeout=120
        ).stdout
        assert '<span id="state" class="state succeeded">succeeded</span>' in dom
        assert '<span id="world">1 rank · world size 2→1 at step 4 (node left)</span>' in dom
        assert 'class="series" data-name="train"' in dom  # the loss curve was drawn
        assert 'class="series" data-name="val"' in dom
        shot = tmp_path / "job.png"
        subprocess.run([*base, f"--screenshot={shot}", page], capture_output=True, timeout=120)
        pixels = imread(shot)[..., :3]
        blue = (abs(pixels - [0x09 / 255, 0x69 / 255, 0xDA / 255]).max(axis=-1) < 0.05).sum()
        assert blue > 100  # the train curve's colour, drawn on the screenshot
    finally:
        srv.close()


def test_the_history_of_a_10000_step_run_keeps_its_extremes_in_100_points(tmp_path: Path) -> None:
    import math
    import random

    from fastapi.testclient import TestClient

    from kiln.serve.app import Settings, create_app
    from kiln.serve.store import JobRow

    run = tmp_path / "state" / "runs" / "long"
    run.mkdir(parents=True)
    rng = random.Random(0)
    train = [
        {
            "split": "train",
            "step": s,
            "lr": 1e-3,
            "loss": 3 * math.exp(-s / 3000) + rng.uniform(0, 0.05),
        }
        for s in range(1, 10_001)
    ]
    train[6788]["loss"], train[1233]["loss"] = 40.0, 1e-3  # a spike and a dip, one step each
    val = [{"split": "val", "step": s, "val_loss": 2.0} for s in range(500, 10_001, 500)]
    rows = sorted(train + val, key=lambda r: (r["step"], r["split"] == "val"))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    app = create_app(Settings(tmp_path / "state", dry_run=True))
    app.state.store.add_job(
        JobRow(
            id="long",
            name="long",
            config={},
            run_dir=str(run),
            state="succeeded",
            attempt=1,
            resume=False,
            created=time.time(),
        )
    )
    url = "/api/training/jobs/long/metrics/history"
    with TestClient(app) as http:
        whole = http.get(url, params={"max_points": 100}).json()
        window = http.get(
            url, params={"since_step": 5000, "until_step": 5999, "max_points": 10}
        ).json()
    points = whole["train"]
    assert 50 <= len(points) <= 100
    assert [r["step"] for r in points] == sorted({r["step"] for r in points})
    assert max(points, key=lambda r: r["loss"])["step"] == 6789
    assert min(points, key=lambda r: r["loss"])["step"] == 1234
    assert whole["val"] == val  # 20 records: under the limit, all of them
    inside = train[4999:5999]
    assert len(window["train"]) <= 10
    assert all(5000 <= r["step"] <= 5999 for r in window["train"])
    kept = {r["step"] for r in window["train"]}
    assert {
        min(inside, key=lambda r: r["loss"])["step"],
        max(inside, key=lambda r: r["loss"])["step"],
    } <= kept


def test_an_executor_cut_off_from_its_jobs_says_so_once_and_keeps_them(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import threading

    from kiln.serve.executor import LocalExecutor
    from kiln.serve.store import JobRow, Store

    class Away(LocalExecutor):  # a cluster that stops answering, then answers again
        answers = False

        def _poll(self, job: JobRow) -> tuple[bool, int | None]:
            if not self.answers:
                raise ConnectionError("the cluster does not answer")
            return False, None

    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    job = JobRow(
        id="j",
        name="j",
        config={},
        run_dir=str(tmp_path / "j"),
        state="running",
        attempt=1,
        resume=False,
        created=time.time(),
    )
    store.add_job(job)
    executor = Away(store)
    loop = threading.Thread(target=executor._loop, args=(0.01,))
    with caplog.at_level(logging.INFO, logger="kiln"):
        loop.start()
        time.sleep(0.5)  # about 50 failed ticks
        executor.answers = True
        time.sleep(0.2)
        executor.close()
        loop.join()
    said = [r.getMessage() for r in caplog.records if r.name == "kiln"]
    assert said == [
        "serve: following the jobs failed; trying again",
        "serve: following the jobs again",
    ]
    assert store.job("j").state == "running"


def test_a_second_server_on_the_same_database_is_refused(tmp_path: Path, database_url: str) -> None:
    """Two servers on one database would both start its queued jobs: the second exits 2."""
    first = Server(tmp_path / "state", "--db", database_url)
    try:
        cmd = [
            sys.executable,
            "-m",
            "kiln",
            "serve",
            "--port",
            "0",
            "--state-dir",
            str(tmp_path / "other"),
            "--db",
            database_url,
            "--token",
            TOKEN,
        ]
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert "another kiln serve uses this database" in lines[0]
        if database_url.startswith("sqlite"):  # the file lock names the holder
            assert f"(pid {first.proc.pid})" in lines[0]
        else:
            assert lines[0].startswith("kiln: error: postgresql+psycopg://")
        assert first.proc.poll() is None  # the first goes on serving
    finally:
        first.close()
    again = Server(tmp_path / "state", "--db", database_url)  # released with its process
    again.close()


def test_reindex_takes_no_pid_from_another_machine(tmp_path: Path) -> None:
    """A run another machine is running (a shared file system): its pid means nothing here,
    even when a process here has that number."""
    from kiln.serve.executor import reindex
    from kiln.serve.store import Store

    runs = tmp_path / "runs"
    (runs / "def456").mkdir(parents=True)
    (runs / "def456.yaml").write_text("name: elsewhere\n")
    there = {
        "format": 1,
        "state": "running",
        "pid": os.getpid(),
        "host": "another-machine",
        "heartbeat": time.time(),
        "step": 3,
        "started_at": 2.0,
    }
    (runs / "def456" / "status.json").write_text(json.dumps(there))
    store = Store(f"sqlite:///{tmp_path / 'serve.db'}")
    assert reindex(store, runs) == ["def456"]
    job = store.job("def456")
    assert (job.state, job.pid, job.pid_start) == ("running", None, None)
