"""`kiln serve` beyond one process: a job on several ranks (`nproc` in the start request),
and the Ray Jobs executor against a local Ray head on 127.0.0.1."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port
from serve_helpers import TOKEN, Server, losses, serve_config

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow


def _world_size(run_dir: str) -> int:
    last = sorted(Path(run_dir, "checkpoints").glob("step-*"))[-1]
    return json.loads((last / "trainer_state.json").read_text())["world_size"]


def _processes_of(run_dir: str) -> list[str]:
    """Command lines of live processes that name `run_dir` (a job's ranks, its torchrun)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if run_dir in text or Path(run_dir).name + ".yaml" in text:
            found.append(text)
    return found


def test_a_job_runs_on_two_ranks_stops_and_resumes(tmp_path: Path) -> None:
    from kiln.client import Client

    raw = serve_config(tmp_path)
    raw["train"]["max_steps"] = 30
    server = Server(tmp_path / "state")
    try:
        api = Client(server.url, token=TOKEN)
        job = api.start(config=raw, nproc=2)
        assert job["nproc"] == 2
        api.wait(job["id"], until=lambda j: j["state"] == "running" and (j["step"] or 0) >= 3)
        api.stop(job["id"])
        paused = api.wait(job["id"], "paused", "failed", "succeeded", timeout_s=120)
        assert (paused["state"], paused["exit_code"]) == ("paused", 3), api.logs(job["id"])
        assert _world_size(paused["run_dir"]) == 2
        deadline = time.monotonic() + 10  # torchrun and both ranks are gone, none orphaned
        while _processes_of(paused["run_dir"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _processes_of(paused["run_dir"]) == []
        api.resume(job["id"])
        done = api.wait(job["id"], "succeeded", "failed", timeout_s=300)
        assert (done["state"], done["attempt"]) == ("succeeded", 2), api.logs(job["id"])
        rows = [
            json.loads(x) for x in Path(done["run_dir"], "metrics.jsonl").read_text().splitlines()
        ]
        assert [r["step"] for r in rows if r["split"] == "train"] == list(range(1, 31))
        log = api.logs(job["id"])
        assert "--nproc 2" in log.split("--- attempt 2:")[1].splitlines()[0]
    finally:
        server.close()


@pytest.fixture(scope="module")
def ray_head() -> Any:
    """A Ray head on 127.0.0.1 for the module's life: the URL of its Jobs API."""
    pytest.importorskip("ray.job_submission")
    ray = Path(sys.executable).with_name("ray")
    if not ray.exists():
        pytest.skip("Ray's command line is not installed beside this Python")
    temp = Path(tempfile.mkdtemp(prefix="kray-", dir="/tmp"))  # short: Ray's socket paths
    dashboard = free_port()
    # Ray turns 127.0.0.1 into the machine's outward address unless told it is one machine
    # (ray_constants.ENABLE_RAY_CLUSTER): so every part of it listens on loopback only.
    env = {
        **os.environ,
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "GLOO_SOCKET_IFNAME": "lo",
    }
    cmd = [
        str(ray),
        "start",
        "--head",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--dashboard-host",
        "127.0.0.1",
        "--dashboard-port",
        str(dashboard),
        "--num-cpus",
        "2",
        "--object-store-memory",
        str(100 * 2**20),
        "--temp-dir",
        str(temp),
        "--disable-usage-stats",
    ]
    started = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    try:
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        subprocess.run([str(ray), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def test_the_ray_executor_runs_stops_and_resumes_jobs_on_a_local_head(
    tmp_path: Path, ray_head: str
) -> None:
    from kiln.client import Client

    raw = serve_config(tmp_path)
    raw["train"]["max_steps"] = 40
    for split in ("train", "val"):  # relative paths are taken from the state dir (serve.md)
        raw["data"][split] = os.path.relpath(raw["data"][split], tmp_path / "state")
    server = Server(
        tmp_path / "state", "--executor", "ray", "--ray-address", ray_head, "--max-concurrent", "2"
    )
    try:
        api = Client(server.url, token=TOKEN)
        job = api.start(config=raw)
        reference = api.start(config=raw, name="reference")
        running = api.wait(reference["id"], until=lambda j: (j["step"] or 0) >= 1)
        status = json.loads(Path(running["run_dir"], "status.json").read_text())
        os.kill(status["pid"], signal.SIGSTOP)  # the reference holds still, mid-run
        api.wait(job["id"], until=lambda j: j["state"] == "running" and (j["step"] or 0) >= 3)
        assert api.status(job["id"])["handle"] == f"kiln-{job['id']}-1"
        api.stop(job["id"])
        paused = api.wait(job["id"], "paused", "failed", "succeeded", timeout_s=120)
        assert (paused["state"], paused["exit_code"]) == ("paused", 3), api.logs(job["id"])
        assert paused["step"] < 40

        # A lost database: a server on a new one, --reindex, finds the Ray job still running.
        other = Server(
            tmp_path / "state",
            "--executor",
            "ray",
            "--ray-address",
            ray_head,
            "--db",
            f"sqlite:///{tmp_path / 'new.db'}",
            "--reindex",
        )
        try:
            found = {j["id"]: j for j in Client(other.url, token=TOKEN).jobs()}
        finally:
            other.close()
        assert found[job["id"]]["state"] == "paused"
        again = found[reference["id"]]
        assert (again["state"], again["handle"]) == ("running", f"kiln-{reference['id']}-1")
        os.kill(status["pid"], signal.SIGCONT)
        api.resume(job["id"])
        done = api.wait(job["id"], "succeeded", "failed", timeout_s=300)
        assert (done["state"], done["attempt"]) == ("succeeded", 2), api.logs(job["id"])
        assert done["handle"] == f"kiln-{job['id']}-2"
        ref = api.wait(reference["id"], "succeeded", "failed", timeout_s=300)
        assert ref["state"] == "succeeded", api.logs(reference["id"])
        assert losses(done["run_dir"]) == losses(ref["run_dir"])  # bit-exact, as a CLI resume
        log = api.logs(job["id"], tail=100_000)  # Ray's own record of both attempts
        assert f"--- attempt 1: ray job kiln-{job['id']}-1" in log
        assert f"--- attempt 2: ray job kiln-{job['id']}-2" in log
    finally:
        server.close()

    # A server restarted with the jobs ended meanwhile finds them through Ray, as they were.
    again = Server(tmp_path / "state", "--executor", "ray", "--ray-address", ray_head)
    try:
        states = {j["id"]: j["state"] for j in Client(again.url, token=TOKEN).jobs()}
        assert states == {job["id"]: "succeeded", reference["id"]: "succeeded"}
    finally:
        again.close()


NOBODY = f"http://127.0.0.1:{free_port()}"


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (
            ["--executor", "ray", "--ray-address", NOBODY],
            f"--ray-address {NOBODY}: no Ray Jobs API answers (Failed to connect to Ray at "
            f"address: {NOBODY}.)",
        ),
        (
            ["--executor", "ray"],
            "--executor ray: give --ray-address http://HEAD:8265 (or $RAY_API_SERVER_ADDRESS)",
        ),
        (["--ray-address", NOBODY], "--ray-address/--gpus-per-rank: only with --executor ray"),
        (["--executor", "ray", "--gpus-per-rank", "-1"], "--gpus-per-rank: at least 0, got -1.0"),
    ],
)
def test_executor_flags_that_cannot_work_are_one_line(
    tmp_path: Path, flags: list[str], said: str
) -> None:
    pytest.importorskip("ray.job_submission")
    cmd = [sys.executable, "-m", "kiln", "serve", "--state-dir", str(tmp_path / "state"), *flags]
    unset = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [f"kiln: error: {said}"], out.stderr
