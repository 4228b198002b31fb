"""kiln.runs: the run-directory layout and the reader that drives runs from outside (status,
metrics by offset, checkpoints, runs under a root), on directories written by hand and by a
real run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiln.checkpoint import CheckpointManager
from kiln.errors import KilnError
from kiln.runs import (
    RunPaths,
    is_alive,
    list_checkpoints,
    list_runs,
    read_config_raw,
    read_metrics,
    read_status,
    read_summary,
    run_dir_of,
    run_state,
    step_of,
)

ROOT = Path(__file__).resolve().parents[1]


def status(run: Path, **fields: object) -> dict[str, object]:
    """Write a format-1 status.json (a running run of this process unless `fields` say else)."""
    data = {
        "format": 1,
        "state": "running",
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "kiln_version": "0.1.0",
        "run_dir": str(run),
        "started_at": time.time() - 5,
        "heartbeat": time.time(),
        "step": 3,
        "total_steps": 10,
        "epoch": 0,
        "tokens": 384,
        "train": {"step": 3, "loss": 4.2},
        "val": {},
        "eta_s": 12.0,
        "stop": None,
        "exit_code": None,
        "error": None,
        "world_size": 1,
    }
    data.update(fields)
    run.mkdir(parents=True, exist_ok=True)
    RunPaths(run).status.write_text(json.dumps(data))
    return data


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_import_is_light_no_torch() -> None:
    code = (
        "import sys, tempfile, pathlib\n"
        "import kiln.runs as r\n"
        "d = pathlib.Path(tempfile.mkdtemp())\n"
        "r.list_runs(d); r.list_checkpoints(d); r.read_status(d); r.read_metrics(d)\n"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')\n"
        "         or m.startswith(('kiln.engine', 'kiln.callbacks', 'kiln.data', 'kiln.models'))]\n"
        "print(heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_layout(tmp_path: Path) -> None:
    run = RunPaths(tmp_path / "r")
    assert run.root == tmp_path / "r"
    names = {
        "config": "config.yaml",
        "metrics": "metrics.jsonl",
        "status": "status.json",
        "summary": "summary.json",
        "data_stats": "data_stats.json",
        "anomalies": "anomalies.jsonl",
        "report": "report.md",
        "checkpoints": "checkpoints",
        "final": "final",
        "plots": "plots",
        "samples": "samples",
        "eval": "eval",
    }
    for attr, name in names.items():
        assert getattr(run, attr) == tmp_path / "r" / name
    assert run.checkpoint(12) == tmp_path / "r" / "checkpoints" / "step-12"
    assert run.samples_at(4) == tmp_path / "r" / "samples" / "step-4.jsonl"
    assert RunPaths(str(tmp_path / "r")) == run
    assert step_of(run.checkpoint(7)) == 7
    assert step_of(tmp_path / ".staging-step-7-123") is None


def test_run_dir_of(tmp_path: Path) -> None:
    run = tmp_path / "r"
    ckpt = RunPaths(run).checkpoint(5)
    ckpt.mkdir(parents=True)
    assert run_dir_of(run / "final") == run
    assert run_dir_of(ckpt) == run
    assert run_dir_of(run) is None  # nothing in it yet
    (run / "config.yaml").write_text("name: r\n")
    assert run_dir_of(run) == run
    copied = tmp_path / "copied-ckpt"  # a checkpoint outside a run has config.yaml too
    copied.mkdir()
    (copied / "config.yaml").write_text("name: r\n")
    (copied / "manifest.json").write_text("{}")
    assert run_dir_of(copied) is None
    assert run_dir_of(tmp_path / "hf-model") is None


def test_read_status(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert read_status(run) is None
    written = status(run)
    assert read_status(run) == written
    # Keys a writer left out read as None; a newer format's extra keys are kept.
    RunPaths(run).status.write_text(json.dumps({"format": 2, "state": "finished", "new": 1}))
    got = read_status(run)
    assert got is not None
    assert got["state"] == "finished"
    assert got["new"] == 1
    assert got["pid"] is None
    assert got["stop"] is None
    assert got["exit_code"] is None
    assert got["heartbeat"] is None
    for junk in ("{not json", "[1, 2]", ""):
        RunPaths(run).status.write_text(junk)
        assert read_status(run) is None


def test_run_state_rules(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert run_state(None) == "unknown"
    assert run_state(status(run)) == "running"  # this process, on this host
    assert is_alive(status(run))
    for state in ("finished", "paused", "failed", "diverged", "stopped"):
        assert run_state(status(run, state=state, pid=dead_pid())) == state
    # This host: the pid decides, whatever the heartbeat says.
    assert run_state(status(run, pid=dead_pid())) == "lost"
    assert run_state(status(run, state="starting", pid=dead_pid())) == "lost"
    assert not is_alive(status(run, pid=dead_pid()))
    assert run_state(status(run, heartbeat=time.time() - 1e6)) == "running"
    # Another host: the heartbeat decides.
    now = time.time()
    remote = status(run, host="elsewhere.invalid", pid=dead_pid(), heartbeat=now - 100)
    assert run_state(remote, now=now) == "running"
    assert run_state(remote, now=now, stale_after_s=60) == "lost"
    assert run_state(remote, now=now + 1e6, stale_after_s=None) == "running"
    assert is_alive(remote, now=now)
    assert not is_alive(remote, now=now, stale_after_s=60)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="zombies are seen via /proc")
def test_a_zombie_pid_is_lost(tmp_path: Path) -> None:
    # A server that has not reaped its `kiln train` child yet: kill(pid, 0) still succeeds.
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.time() + 30
        while Path(f"/proc/{proc.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
            assert time.time() < deadline
            time.sleep(0.02)
        assert run_state(status(tmp_path / "r", pid=proc.pid)) == "lost"
    finally:
        proc.wait()


def test_read_metrics_tails_a_live_file(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    path = RunPaths(run).metrics
    assert read_metrics(run) == ([], 0)  # not written yet
    a = {"step": 1, "split": "train", "loss": 2.0}
    b = {"step": 2, "split": "train", "loss": 1.5}
    c = {"step": 2, "split": "val", "val_loss": 1.7, "loss": 1.7}
    line_a, line_b = json.dumps(a) + "\n", json.dumps(b) + "\n"
    torn = json.dumps(c)[:10]
    path.write_text(line_a + line_b + torn)
    records, offset = read_metrics(run)
    assert records == [a, b]
    assert offset == len((line_a + line_b).encode())
    assert read_metrics(run, offset) == ([], offset)  # the torn line waits
    with open(path, "a") as f:
        f.write(json.dumps(c)[10:])  # whole, but no newline yet
    assert read_metrics(run, offset) == ([], offset)
    assert read_metrics(run, offset, unterminated=True) == ([c], offset)
    with open(path, "a") as f:
        f.write("\nnot json\n[1]\n" + json.dumps({"split": "train"}) + "\n")
    records, end = read_metrics(run, offset)
    assert records == [c]  # lines that are not records are skipped
    assert end == path.stat().st_size
    assert read_metrics(run)[0] == [a, b, c]


def test_read_metrics_after_a_resume_rewrote_the_file(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    path = RunPaths(run).metrics
    recs = [{"step": s, "split": "train", "loss": 1.0 / s} for s in range(1, 6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    _, offset = read_metrics(run)
    # Resumed from step 2: the file is rewritten shorter, then grows again.
    path.write_text("".join(json.dumps(r) + "\n" for r in recs[:2]))
    assert read_metrics(run, offset) == (recs[:2], path.stat().st_size)
    more = [{"step": s, "split": "train", "loss": 9.0} for s in range(3, 7)]
    with open(path, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in more))
    got, _ = read_metrics(run, offset)  # offset now falls mid-line: read again from the start
    assert got == recs[:2] + more


def fake_writers(size: int) -> dict[str, object]:
    def write(path: Path) -> None:
        path.write_bytes(b"x" * size)

    return {"model.safetensors": write, "trainer_state.json": write, "config.yaml": write}


def test_list_checkpoints(tmp_path: Path) -> None:
    run = tmp_path / "r"
    assert list_checkpoints(run) == []
    root = RunPaths(run).checkpoints
    manager = CheckpointManager(root, keep_last=10)
    for step in (2, 4, 10):
        manager.save(step, fake_writers(100 + step), metrics={"val_loss": 1.0 / step})
    (RunPaths(run).checkpoint(4) / "model.safetensors").write_bytes(b"short")  # torn file
    RunPaths(run).checkpoint(6).mkdir()  # killed before its manifest
    (root / ".staging-step-12-99").mkdir()  # being written
    (root / "notes.txt").write_text("mine")

    found = list_checkpoints(run)
    assert [(c.step, c.path, c.complete) for c in found] == [
        (2, root / "step-2", True),
        (4, root / "step-4", False),
        (6, root / "step-6", False),
        (10, root / "step-10", True),
    ]
    step, _, manifest, complete = found[-1]  # a tuple too
    assert (step, complete) == (10, True)
    assert manifest is not None
    assert manifest["step"] == 10
    assert manifest["metrics"] == {"val_loss": 0.1}
    assert manifest["files"]["model.safetensors"]["size"] == 110
    assert found[2].manifest is None
    # The complete ones are exactly those the checkpoint manager would resume from.
    assert [c.path for c in found if c.complete] == [i.path for i in manager.list()]


def test_list_runs(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.yaml").write_text("name: a\n")
    status(tmp_path / "b", state="finished", exit_code=0)
    status(tmp_path / "c", pid=dead_pid())
    status(tmp_path / "sweep" / "trial-1")  # nested: found with recursive=True
    (tmp_path / "plain").mkdir()
    (tmp_path / ".hidden").mkdir()
    status(tmp_path / ".hidden" / "r")
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "a" / "checkpoints").mkdir()
    status(tmp_path / "a" / "checkpoints" / "inner")  # inside a run: not a run of its own

    runs = list_runs(tmp_path)
    assert [(r.path.name, r.state) for r in runs] == [
        ("a", "unknown"),
        ("b", "finished"),
        ("c", "lost"),
    ]
    assert runs[0].status is None
    assert runs[1].status["exit_code"] == 0
    deep = list_runs(tmp_path, recursive=True)
    assert [r.path.relative_to(tmp_path).as_posix() for r in deep] == [
        "a",
        "b",
        "c",
        "sweep/trial-1",
    ]
    assert deep[-1].state == "running"
    assert list_runs(tmp_path / "missing") == []


def test_summary_and_config(tmp_path: Path) -> None:
    run = tmp_path / "r"
    run.mkdir()
    assert read_summary(run) is None
    assert read_config_raw(run) is None
    RunPaths(run).summary.write_text(json.dumps({"steps": 20}))
    assert read_summary(run) == {"steps": 20}
    RunPaths(run).summary.write_text("{torn")
    with pytest.raises(KilnError, match=r"summary.json: cannot read \(Expecting"):
        read_summary(run)
    RunPaths(run).config.write_text("name: r\ntrain: {max_steps: 5}\n")
    assert read_config_raw(run) == {"name": "r", "train": {"max_steps": 5}}
    final = RunPaths(run).final
    final.mkdir()
    (final / "kiln_config.yaml").write_text("name: from-final\n")
    assert read_config_raw(final) == {"name": "from-final"}
    for text, why in (("[1, 2]", "not a kiln config"), ("a: [", "unreadable: ")):
        RunPaths(run).config.write_text(text)
        with pytest.raises(KilnError, match=why) as info:
            read_config_raw(run)
        assert "\n" not in str(info.value)


def test_a_real_run_read_from_outside(tmp_path: Path, recipe_files) -> None:
    from helpers import tiny_config

    from kiln import Trainer

    cfg = tiny_config(
        tmp_path, *recipe_files, train={"max_steps": 6}, checkpoint={"every_steps": 3}
    )
    result = Trainer(cfg).fit()
    run = cfg.run_dir
    st = read_status(run)
    assert st is not None
    assert (st["state"], st["exit_code"], st["step"], st["total_steps"]) == ("finished", 0, 6, 6)
    assert st["pid"] == os.getpid()
    assert st["host"] == socket.gethostname()
    assert st["heartbeat"] >= st["started_at"]
    assert run_state(st) == "finished"
    assert not is_alive(st)
    records, offset = read_metrics(run)
    assert offset == RunPaths(run).metrics.stat().st_size
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [5, 6]  # every log.every_steps=5, and the last step
    assert st["train"]["loss"] == train[-1]["loss"]
    found = list_checkpoints(run)
    assert [(c.step, c.complete) for c in found] == [(3, True), (6, True)]
    assert run_dir_of(result.final_dir) == run == run_dir_of(found[0].path)
    assert read_summary(run)["steps"] == 6
    assert read_config_raw(run)["name"] == "tiny"
    assert [(r.path, r.state) for r in list_runs(tmp_path)] == [(run, "finished")]
