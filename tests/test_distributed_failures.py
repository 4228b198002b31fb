"""When a rank dies or hangs (DDP on CPU with gloo under torchrun): the job fails fast with
nothing left running, every surviving rank says where it was, the last complete checkpoint
loads, `--max-restarts` with `checkpoint.resume: auto` finishes the run, and a job killed at any
moment resumes bit-exactly."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import free_port, gloo_env, make_rows, process_tree, tiny_raw, write_jsonl
from safetensors.torch import load_file

from kiln.checkpoint import CheckpointManager

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

STEPS = 24
TIMEOUT_S = 20  # train.distributed.timeout_s of the killed runs


def _config(tmp: Path, name: str) -> Path:
    """World 2 x batch 4, two micro-batches a step, a checkpoint every 2 steps, resume auto."""
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(160, seed=7))
        write_jsonl(tmp / "val.jsonl", make_rows(24, seed=8))
    raw = tiny_raw(tmp, data, tmp / "val.jsonl")
    raw["output_dir"] = str(tmp / name)
    raw["data"]["cache_dir"] = str(tmp / "cache")
    raw["optim"] = {"lr": 3e-3, "warmup_steps": 0, "scheduler": "constant"}
    raw["train"] = {
        "max_steps": STEPS,
        "batch_size": 4,
        "grad_accum_steps": 2,
        "num_threads": 1,
        "distributed": {"timeout_s": TIMEOUT_S},
    }
    raw["eval"] = {"every_steps": 12}
    raw["checkpoint"] = {"every_steps": 2, "keep_last": 2, "resume": "auto"}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# ---- processes -----------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def _ours(mark: str) -> list[int]:
    """Live processes whose command line holds `mark` (a test's tmp path)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if mark in (proc / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(proc.name))
    return [pid for pid in found if _alive(pid)]


def _rank_pid(mark: str, rank: int) -> int | None:
    """The pid of rank `rank` among our processes (its RANK in /proc/PID/environ): the one
    whose parent is not such a process too (a child the rank forks, for a moment, has the
    rank's environment and command line)."""
    found = []
    for pid in _ours(mark):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            found.append(pid)
    mains = [pid for pid in found if _parent(pid) not in found]
    return min(mains) if mains else None


def _parent(pid: int) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    return None


def _kill_all(mark: str) -> None:
    """SIGKILL every process this test started (found by its tmp path), by pid."""
    for pid in _ours(mark):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@dataclass
class Job:
    """`kiln -q train CONFIG --nproc 2 ...` in its own session; its output goes to `log`."""

    config: Path
    proc: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def launch(cls, config: Path, *extra: str) -> Job:
        log = config.with_suffix(f".{len(list(config.parent.glob('*.log')))}.log")
        cmd = [sys.executable, "-m", "kiln", "-q", "train", str(config), "--nproc", "2", *extra]
        with log.open("w") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=gloo_env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return cls(config, proc, log)

    def wait_for(self, what: Callable[[], Any], timeout: float = 120) -> Any:
        """Poll `what()` until it is truthy, while the job runs."""
        deadline = time.monotonic() + timeout
        while not (found := what()):
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"waited {timeout}s"
            time.sleep(0.02)
        return found

    def checkpoint_after(self, step: int) -> int:
        """Wait for a complete checkpoint past `step`; its step."""
        checkpoints = CheckpointManager(self.config.parent / self.config.stem / "checkpoints")
        latest = lambda: (c := checkpoints.latest()) is not None and c.step > step and c.step  # noqa: E731
        return self.wait_for(latest)

    def rank_pid(self, rank: int) -> int:
        return self.wait_for(lambda: _rank_pid(str(self.config), rank))

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            _kill_all(str(self.config))


def _steps(run: Path) -> list[int]:
    return [c.step for c in CheckpointManager(run / "checkpoints").list()]


def _train_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["split"] == "train"]


def _status(run: Path) -> dict[str, Any]:
    return json.loads((run / "status.json").read_text())


# ---- the runs ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("failures")
    yield path
    _kill_all(str(path))


@pytest.fixture(scope="module")
def reference(tmp: Path) -> Path:
    """The uninterrupted world-2 run."""
    job = Job.launch(_config(tmp, "ref"))
    assert job.wait(timeout=240) == 0, job.log.read_text()[-3000:]
    return tmp / "ref"


@pytest.fixture(scope="module")
def one_rank_killed(tmp: Path) -> dict[str, Any]:
    """Rank 1 of a world-2 run SIGKILLed mid-run, as soon as its step-4 checkpoint is complete
    (the pid found before, so rank 0 is still in step 5 then); no restarts. Rank 0 gets a
    SIGTERM at once, as from torchrun when its monitor notices the death before rank 0's
    collective fails (seen on a loaded machine): rank 0 must still say where it was."""
    job = Job.launch(_config(tmp, "chain"))
    victim, survivor = job.rank_pid(1), job.rank_pid(0)
    job.checkpoint_after(2)
    tree = process_tree(job.proc.pid)  # the launcher, torchrun, the ranks
    os.kill(victim, signal.SIGKILL)
    os.kill(survivor, signal.SIGTERM)
    killed = time.monotonic()
    try:
        code = job.proc.wait(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - killed
        time.sleep(0.5)  # for init to reap an orphan, if there were one
        left = [pid for pid in tree if _alive(pid)] + _ours(str(job.config))
    finally:
        _kill_all(str(job.config))
    run = tmp / "chain"
    return {
        "run": run,
        "code": code,
        "took": took,
        "tree": tree,
        "left": left,
        "log": job.log.read_text(),
        "status": _status(run),
    }


def test_killing_one_rank_fails_the_job_fast_with_nothing_left(one_rank_killed) -> None:
    killed = one_rank_killed
    assert killed["code"] == 1, killed["log"][-3000:]  # the run's own code, read back
    print(f"SIGKILL of rank 1 to the launcher's exit: {killed['took']:.1f}s")
    assert killed["took"] < TIMEOUT_S + 30
    assert len(killed["tree"]) >= 4, killed["tree"]  # launcher, torchrun, 2 ranks
    assert killed["left"] == []  # nothing of the job is still running (or a zombie)
    # The last complete checkpoint loads: listed, and every file matches its manifest.
    checkpoints = CheckpointManager(killed["run"] / "checkpoints")
    latest = checkpoints.latest()
    assert latest is not None
    assert 4 <= latest.step < STEPS
    assert checkpoints.verify(latest.path).step == latest.step
    assert not (killed["run"] / "final").exists()


def test_the_surviving_rank_reports_where_it_was(one_rank_killed) -> None:
    killed = one_rank_killed
    lines = [x for x in killed["log"].splitlines() if "collective timed out or a peer died" in x]
    assert len(lines) == 1, killed["log"][-3000:]  # rank 0 only: rank 1 is dead
    line = lines[0]
    assert line.startswith("kiln: rank 0: collective timed out or a peer died at step "), line
    # step S, micro-step M (1-based): two micro-batches a step, so M is 2S - 1 or 2S.
    step = int(line.split("at step ")[1].split(",")[0])
    micro = int(line.split("micro-step ")[1].split(",")[0])
    assert 4 <= step < STEPS, line
    assert micro in (2 * step - 1, 2 * step), line
    assert ", last collective " in line or line.endswith(", backward (DDP gradient all-reduce)")
    assert "Connection closed by peer" in killed["log"] or "Connection reset" in killed["log"]
    status = killed["status"]  # written by rank 0
    assert (status["state"], status["exit_code"]) == ("failed", 1)
    assert status["error"] == line.removeprefix("kiln: ")


def test_killed_at_random_then_restarted_resumes_bit_exactly(
    tmp: Path, reference: Path, one_rank_killed
) -> None:
    """The killed run goes on: the whole job SIGKILLed at a random moment (after one more
    checkpoint), then resumed (auto) with `--max-restarts 1`, where rank 1 is SIGKILLed again
    and torchrun restarts the ranks. The result equals the uninterrupted run's, bit for bit."""
    run = one_rank_killed["run"]
    job = Job.launch(tmp / "chain.yaml")
    job.checkpoint_after(max(_steps(run)))
    time.sleep(random.Random(13).uniform(0.05, 0.5))
    assert job.proc.poll() is None
    for pid in process_tree(job.proc.pid):  # the whole job at once: launcher, torchrun, ranks
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    job.wait(timeout=30)
    before = max(_steps(run))
    assert before < STEPS - 4  # room left for the restart below

    job = Job.launch(tmp / "chain.yaml", "--max-restarts", "1")
    job.checkpoint_after(before)
    victim = job.rank_pid(1)  # the rank that is training now
    os.kill(victim, signal.SIGKILL)
    code = job.wait(timeout=240)
    log = job.log.read_text()
    assert code == 0, log[-3000:]
    assert log.count("collective timed out or a peer died") == 1  # rank 0, before the restart
    status = _status(run)
    assert (status["state"], status["exit_code"], status["step"]) == ("finished", 0, STEPS)
    assert _train_steps(run) == list(range(1, STEPS + 1))  # each step logged exactly once
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("step-")]
    assert leftovers == []
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(reference / "final" / "model.safetensors")
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[name], b[name]) for name in b)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref]


# ---- the report of a rank, without a whole run ---------------------------------------------------

RANKS = """
import os, sys, time
import torch
from kiln.rank import CollectiveFailed, RankContext

out, case = sys.argv[1], sys.argv[2]
rank = RankContext.setup("gloo", timeout_s=6)  # room for ranks that start seconds apart
rank.where.step, rank.where.micro_step = 7, 14  # as RankWhereabouts sets them
rank.all_reduce_sum(torch.ones(1), "window targets")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(4, 4))
if rank.rank == 1:
    if case == "hang":
        time.sleep(8)  # past rank 0's timeout, then gone
    os._exit(0)
try:
    if case == "hang":
        rank.all_reduce_sum(torch.ones(1), "window loss")
    else:  # rank 1 is gone before the gradient all-reduce of backward
        time.sleep(1)
        with rank.no_sync(model, enabled=False):
            model(torch.ones(2, 4)).sum().backward()
except CollectiveFailed as exc:
    cause = str(exc.__cause__).splitlines()[0]
    open(f"{out}/{case}.txt", "w").write(f"{exc}\\n{cause}\\n")
"""


def test_a_failed_collective_names_the_rank_position_and_collective(tmp_path: Path) -> None:
    """A peer that hangs past the timeout, and one gone before DDP's all-reduce in backward:
    two world-2 process groups side by side (the ranks started as torchrun would, by env)."""
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    procs = []
    try:
        for case in ("hang", "backward"):
            port = str(free_port())
            for r in (0, 1):
                env = {**gloo_env(), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
                env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2")
                cmd = [sys.executable, str(script), str(tmp_path), case]
                procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE))
        errors = [p.communicate(timeout=90)[1].decode()[-2000:] for p in procs]
    finally:
        _kill_all(str(script))
    assert [p.returncode for p in procs] == [0, 0, 0, 0], errors
    where = "rank 0: collective timed out or a peer died at step 7, micro-step 14, "
    report, cause = (tmp_path / "hang.txt").read_text().splitlines()
    assert report == where + "last collective all_reduce_sum (window loss)"
    assert "Timed out waiting 6000ms" in cause
    report, cause = (tmp_path / "backward.txt").read_text().splitlines()
    assert report == where + "backward (DDP gradient all-reduce)"
    assert "Connection closed by peer" in cause


# ---- the launcher --------------------------------------------------------------------------------


def test_max_restarts_goes_to_torchrun_and_a_decided_end_is_not_restarted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln.cli import build_parser
    from kiln.commands import train as command

    one = ["train", "c.yaml", "--nproc", "2"]
    args = build_parser().parse_args([*one, "--max-restarts", "1"])
    cmd = command._launch(args)
    assert cmd[cmd.index("--max-restarts") + 1] == "1"
    assert "--max-restarts" not in command._launch(build_parser().parse_args(one))
    assert command._launch_env(args) is None  # one machine: the ranks prefix their store keys
    nodes = build_parser().parse_args(
        [*one, "--max-restarts", "1", "--nnodes", "2", "--rdzv-endpoint", "h:1"]
    )
    assert (command._launch_env(nodes) or {})["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    # On a rank under torchrun --max-restarts, a pause (3) or a divergence (4) exits 0, or
    # torchrun would restart it; a failure (1) is restarted.
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "1")
    for own, seen in ((3, 0), (4, 0), (1, 1), (0, 0)):
        monkeypatch.setattr(command, "_train", lambda _, own=own: own)
        assert command.run(args) == seen
    monkeypatch.setenv("TORCHELASTIC_MAX_RESTARTS", "0")
    assert command.run(args) == 0  # the last _train said 0
    monkeypatch.setattr(command, "_train", lambda _: 3)
    assert command.run(args) == 3
    # `kiln train --nproc` reads the run's own code back from status.json, also when torchrun
    # said 0; a status.json the launch did not change is not read back.
    run = tmp_path / "run"
    run.mkdir()
    status = json.dumps({"state": "paused", "exit_code": 3})
    write = f"open({str(run / 'status.json')!r}, 'w').write({status!r})"
    assert command._run_launcher([sys.executable, "-c", write], run) == 3
    assert command._run_launcher([sys.executable, "-c", "raise SystemExit(1)"], run) == 1
