"""Elastic training: `kiln train --nnodes MIN:MAX` keeps going when a node leaves or joins, at
the new world size, with the same global batch and every sample counted once.

Two "nodes" are two torchrun agents (`kiln train --nproc 1 --nnodes 1:2`) on 127.0.0.1 with one
c10d rendezvous; the first one started hosts its store (the node killed is always the other:
c10d's store lives in the agent that hosts it, see docs/distributed.md). Their run equals an
uninterrupted one-process run with the same global batch: the checkpoints' data cursors are the
same at every step (the same samples, none twice, none skipped), each step is logged once, and
the losses agree within the cross-world-size tolerance of docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import free_port, gloo_env, make_rows, process_tree, tiny_raw, write_jsonl

from kiln.config import load_config
from kiln.engine.elastic import Shares, WorldSizeRefused, plan
from kiln.errors import KilnError
from kiln.runs import read_status

ROOT = Path(__file__).resolve().parents[1]
STEPS = 48
EVERY = 4  # checkpoint cadence
KILL_AT = 12  # the step after which a node leaves (or joins)
GLOBAL = 8  # sequences a step: world 2 x 4, or world 1 x 8 run as 2 micro-batches of 4


def _config(tmp: Path, name: str, **train: Any) -> Path:
    data = tmp / "train.jsonl"
    if not data.exists():
        write_jsonl(data, make_rows(200, seed=7))
    raw = tiny_raw(tmp, data, None)
    raw["output_dir"] = str(tmp / name)
    raw["optim"] = {"lr": 1e-3, "warmup_steps": 0, "scheduler": "constant"}
    raw["train"] = {
        "max_steps": STEPS,
        "batch_size": 4,
        "num_threads": 1,
        "distributed": {"timeout_s": 30, "elastic": {"global_batch": GLOBAL}},
        **train,
    }
    raw["checkpoint"] = {"every_steps": EVERY, "keep_last": 100, "resume": "auto"}
    raw["log"] = {"every_steps": 1, "progress": "none", "plots": False}
    raw["eval"] = {"every_steps": 1000}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Node:
    """One `kiln train --nproc 1 --nnodes MIN:MAX` agent, in its own session."""

    def __init__(self, config: Path, port: int, name: str, nodes: str, conf: str) -> None:
        self.log = config.parent / f"{name}.log"
        cmd = [sys.executable, "-m", "kiln", "-q", "train", str(config), "--nproc", "1"]
        cmd += ["--nnodes", nodes, "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-conf", conf]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                cmd, cwd=ROOT, env=gloo_env(), stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip

    def hosting(self, port: int, timeout: float = 60) -> Node:
        """Wait until this agent hosts the rendezvous store (listens on `port`)."""
        import socket

        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, self.text()[-3000:]
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return self
            assert time.monotonic() < deadline, "the rendezvous store did not start"
            time.sleep(0.05)

    def rank_pid(self) -> int:
        """The pid of this node's rank (torchrun's worker: LOCAL_RANK in its environment)."""
        ranks = []
        for pid in process_tree(self.proc.pid)[1:]:
            with contextlib.suppress(OSError):
                if b"LOCAL_RANK=0" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    ranks.append(pid)
        assert ranks, self.text()[-3000:]
        return ranks[0]  # breadth first: the worker before anything it started

    def kill(self) -> None:
        """SIGKILL the agent and its ranks at once (a machine gone)."""
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(self.log.read_text()[-3000:]) from None

    def text(self) -> str:
        return self.log.read_text()


def _rows(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def _train(run: Path) -> list[dict[str, Any]]:
    return [r for r in _rows(run) if r.get("split") == "train"]


def _wait_steps(run: Path, step: int, *nodes: Node, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not any(r["step"] >= step for r in _train(run)):
        for node in nodes:
            assert node.proc.poll() is None, node.text()[-3000:]
        assert time.monotonic() < deadline, f"no step {step} within {timeout}s"
        time.sleep(0.02)


def _wait_pending(pid: int, sig: int, *nodes: Node, timeout: float = 60) -> None:
    """Wait until `sig` is pending for the (stopped) process `pid`."""
    bit = 1 << (sig - 1)
    deadline = time.monotonic() + timeout
    while True:
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        if (int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)) & bit:
            return
        for node in nodes:
            assert node.proc.poll() is None, node.text()[-3000:]
        assert time.monotonic() < deadline, f"no {sig} pending within {timeout}s"
        time.sleep(0.02)


def _cursors(run: Path) -> dict[int, tuple[int, int, int]]:
    """step -> (epoch, cursor, samples seen) of every checkpoint."""
    found = {}
    for path in (run / "checkpoints").glob("step-*/trainer_state.json"):
        state = json.loads(path.read_text())["loop"]["state"]
        found[state["step"]] = (state["epoch"], state["cursor"], state["samples_seen"])
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run: one process, batch 8, a checkpoint every 4 steps."""
    tmp = tmp_path_factory.mktemp("elastic")
    config = _config(tmp, "reference", batch_size=GLOBAL)
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "-q", "train", str(config)],
        cwd=ROOT, env=gloo_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp / "reference"


def _same_run(run: Path, reference: Path, changed_at: int) -> None:
    """Every step logged once; the same samples (cursors at every common checkpoint); losses
    within 1e-5 relative before the world size changed and 1e-4 after (docs/distributed.md)."""
    rows, ref = _train(run), _train(reference)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ref]
    mine, theirs = _cursors(run), _cursors(reference)
    assert len(mine) >= STEPS // EVERY - 1
    assert set(mine) <= set(theirs)
    assert all(mine[step] == theirs[step] for step in mine), (mine, theirs)
    for r, q in zip(rows, ref, strict=True):
        tol = 1e-5 if r["step"] <= changed_at else 1e-4
        assert r["loss"] == pytest.approx(q["loss"], rel=tol), (r["step"], r["loss"], q["loss"])


def _change(run: Path) -> dict[str, Any]:
    """The one world-size change, as metrics.jsonl and status.json record it."""
    changes = [r for r in _rows(run) if r.get("split") == "world_size"]
    status = read_status(run)
    assert status is not None
    assert len(changes) == 1, (changes, status)
    assert status["world_size_changes"] == [{k: v for k, v in changes[0].items() if k != "split"}]
    return changes[0]


RDZV = "join_timeout=90,last_call_timeout=3"


@pytest.mark.slow
def test_a_node_that_dies_leaves_the_run_going_on_one_node(tmp_path: Path, reference: Path):
    config = _config(tmp_path, "leave")
    port, run = free_port(), tmp_path / "leave"
    first = Node(config, port, "first", "1:2", RDZV).hosting(port)  # the store's node
    second = Node(config, port, "second", "1:2", RDZV)
    try:
        _wait_steps(run, KILL_AT, first, second)
        assert read_status(run)["world_size"] == 2
        second.kill()  # the machine is gone: its agent and its rank
        assert first.wait(timeout=150) == 0, first.text()[-3000:]
    finally:
        for node in (first, second):
            if node.proc.poll() is None:
                node.kill()
    status = read_status(run)
    assert (status["state"], status["exit_code"], status["world_size"]) == ("finished", 0, 1)
    change = _change(run)
    assert (change["from"], change["to"], change["reason"]) == (2, 1, "node left")
    train = yaml.safe_load((run / "config.yaml").read_text())["train"]
    assert (train["batch_size"], train["distributed"]["elastic"]["micro_batch"]) == (8, 4)
    assert KILL_AT - EVERY <= change["step"] <= KILL_AT + 2 * EVERY
    _same_run(run, reference, change["step"])
    assert "rank 0: collective timed out or a peer died at step" in first.text()  # as it happened


@pytest.mark.slow
def test_a_node_that_joins_is_taken_in_at_the_next_restart(tmp_path: Path, reference: Path):
    config = _config(tmp_path, "join")
    port, run = free_port(), tmp_path / "join"
    first = Node(config, port, "first", "1:2", "join_timeout=90,last_call_timeout=1").hosting(port)
    second = None
    try:
        _wait_steps(run, KILL_AT, first)
        assert read_status(run)["world_size"] == 1  # 8 a step: 2 micro-batches of 4
        rank = first.rank_pid()
        os.kill(rank, signal.SIGSTOP)  # held at its step until the new node is seen
        second = Node(config, port, "second", "1:2", "join_timeout=90,last_call_timeout=1")
        _wait_pending(rank, signal.SIGTERM, first, second)  # the agent's membership notice
        os.kill(rank, signal.SIGCONT)
        assert first.wait(timeout=150) == 0, first.text()[-3000:]
        assert second.wait(timeout=30) == 0, second.text()[-3000:]
    finally:
        for node in (first, second):
            if node is not None and node.proc.poll() is None:
                node.kill()
    status = read_status(run)
    assert (status["state"], status["world_size"]) == ("finished", 2)
    change = _change(run)
    assert (change["from"], change["to"], change["reason"]) == (1, 2, "node joined")
    assert change["step"] >= KILL_AT
    # The agent's SIGTERM checkpointed the step it stopped at, off the 4-step cadence.
    assert change["step"] in _cursors(run)
    _same_run(run, reference, change["step"])
    assert "continue with" not in first.text()  # a membership change is no pause


@pytest.mark.slow
def test_a_rendezvous_short_of_min_nodes_pauses_with_one_line(tmp_path: Path):
    config = _config(tmp_path, "short")
    port, run = free_port(), tmp_path / "short"
    conf = "join_timeout=6,last_call_timeout=1"
    first = Node(config, port, "first", "2:2", conf).hosting(port)
    second = Node(config, port, "second", "2:2", conf)
    try:
        _wait_steps(run, KILL_AT, first, second)
        second.kill()
        code = first.wait(timeout=120)
    finally:
        for node in (first, second):
            if node.proc.poll() is None:
                node.kill()
    text = first.text()
    assert code == 3, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("kiln: rendezvous at 127.0.0.1:")
    assert "fewer than 2 nodes" in last
    assert "Traceback" not in text
    status = read_status(run)
    assert (status["state"], status["exit_code"]) == ("paused", 3)
    assert status["stop"]["kind"] == "rendezvous"
    checkpoints = sorted(_cursors(run))
    assert checkpoints
    assert checkpoints[-1] >= KILL_AT - EVERY
    resumed = subprocess.run(
        [sys.executable, "-m", "kiln", "-q", "train", "--resume", str(run), "train.max_steps=50"],
        cwd=ROOT, env=gloo_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_status(run)["world_size_changes"][-1]["reason"] == "resumed"


# ---- the shares of a step, without processes ---------------------------------------------


def _cfg(tmp: Path, **elastic: Any) -> Any:
    raw = tiny_raw(tmp, tmp / "t.jsonl", None)
    raw["train"] = {"max_steps": 4, "batch_size": 4, "grad_accum_steps": 2}
    raw["train"]["distributed"] = {"elastic": {"keep": "global_batch", **elastic}}
    return load_config(data=raw)


def _checkpoint(tmp: Path, batch: int, world: int) -> Path:
    path = tmp / f"ck-{batch}-{world}"
    path.mkdir()
    (path / "trainer_state.json").write_text(json.dumps({"world_size": world}))
    (path / "config.yaml").write_text(yaml.safe_dump({"train": {"batch_size": batch}}))
    return path


def test_each_rank_takes_its_share_of_the_checkpoints_global_micro_batch(tmp_path: Path):
    cfg = _cfg(tmp_path)
    ck = _checkpoint(tmp_path, 4, 2)  # 8 a draw, 2 draws a step
    one, shares = plan(cfg, 1, ck)
    assert one.train.batch_size == 8
    assert one.train.grad_accum_steps == 2
    assert shares == Shares(unit=8, per_rank=8, micro=4)  # vary grad_accum_steps: 2 x 4
    assert one.train.distributed.elastic.micro_batch == 4  # config.yaml keeps the limit
    # `kiln train --resume RUN_DIR` reads that config.yaml (batch 8): still micro-batches of 4
    again = load_config(data=one.model_dump(mode="json"))
    assert plan(again, 1, ck)[1] == Shares(8, 8, 4)
    assert plan(again, 2, ck)[0].train.batch_size == 4
    four, shares = plan(cfg, 4, ck)
    assert four.train.batch_size == 2
    assert shares == Shares(8, 2, None)
    same, shares = plan(cfg, 2, ck)
    assert same is cfg
    assert shares == Shares(8, 4, None)
    whole, shares = plan(_cfg(tmp_path, vary="batch_size"), 1, ck)
    assert whole.train.batch_size == 8
    assert shares.micro is None
    fresh, shares = plan(_cfg(tmp_path, global_batch=24), 3, None)  # 24 / 2 = 12 a draw
    assert fresh.train.batch_size == 4
    assert shares == Shares(12, 4, None)
    started, shares = plan(_cfg(tmp_path), 3, None)  # a new run: its first world size
    assert started.train.batch_size == 4
    assert shares.unit == 12
    kept, _ = plan(load_config(data=tiny_raw(tmp_path, tmp_path / "t.jsonl", None)), 1, ck)
    assert kept.train.batch_size == 4  # keep: null changes nothing (check_compatible refuses)


def test_a_world_size_that_cannot_keep_the_global_batch_pauses_or_waits(tmp_path: Path):
    ck = _checkpoint(tmp_path, 4, 2)
    with pytest.raises(WorldSizeRefused) as stop:
        plan(_cfg(tmp_path, indivisible="stop"), 3, ck)
    assert "world size 3 cannot keep the global batch (8 x 2 accumulation = 16" in str(stop.value)
    assert stop.value.exit_code == 3
    start = time.monotonic()
    with pytest.raises(WorldSizeRefused, match="no membership change within 1 s"):
        plan(_cfg(tmp_path, wait_s=1), 3, ck)
    assert time.monotonic() - start >= 1


def test_a_global_batch_must_be_a_multiple_of_the_accumulation(tmp_path: Path):
    with pytest.raises(KilnError, match="global_batch: 9 is not a multiple of"):
        _cfg(tmp_path, global_batch=9)


def test_a_split_draw_keeps_every_row_in_order_and_pairs_together():
    batch = {"input_ids": torch.arange(10).view(5, 2), "labels": torch.arange(10).view(5, 2)}
    parts = Shares(10, 5, 2).split([batch], "causal_lm")
    assert [p["input_ids"][:, 0].tolist() for p in parts] == [[0, 2], [4, 6], [8]]
    pairs = {"input_ids": torch.arange(6).view(6, 1)}  # 3 chosen, then 3 rejected
    parts = Shares(6, 3, 2).split([pairs], "preference")
    assert [p["input_ids"].view(-1).tolist() for p in parts] == [[0, 1, 3, 4], [2, 5]]
    assert Shares(8, 4).split([batch], "causal_lm") == [batch]


def test_the_elastic_launch_is_torchruns_with_resume_and_the_global_batch_kept():
    from kiln.cli import build_parser
    from kiln.commands.train import _launch, _launch_env

    args = build_parser().parse_args(
        ["train", "c.yaml", "--nproc", "2", "--nnodes", "1:4", "--rdzv-endpoint", "h:1",
         "--rdzv-conf", "join_timeout=60"]
    )  # fmt: skip
    cmd = _launch(args)
    assert cmd[cmd.index("--nnodes") + 1] == "1:4"
    assert "--node-rank" not in cmd
    assert cmd[cmd.index("--max-restarts") + 1] == "10"
    assert cmd[cmd.index("--rdzv-conf") + 1] == "join_timeout=60"
    assert cmd[-2:] == ["checkpoint.resume=auto", "train.distributed.elastic.keep=global_batch"]
    env = _launch_env(args)
    assert env["KILN_ELASTIC"] == "1"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    for bad, said in [("0:2", "1 <= MIN <= MAX"), ("3:2", "1 <= MIN <= MAX"), ("a", "N or MIN")]:
        args.nnodes = bad
        with pytest.raises(KilnError, match=said):
            _launch(args)


# ---- what the readers show: the report, the loss plot, the server's job -----------------------


def _elastic_run(tmp: Path) -> Path:
    """A run directory as an elastic run leaves it: 2 ranks, then 1 from step 12."""
    run = tmp / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"name": "el", "train": {"batch_size": 4}}))
    rows = [{"step": s, "split": "train", "loss": 3.0 - s / 10, "lr": 1e-3} for s in range(1, 21)]
    change = {"step": 12, "from": 2, "to": 1, "reason": "node left", "time": 1.0}
    rows.insert(12, {"split": "world_size", **change})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    status = {"state": "running", "step": 20, "world_size": 1, "world_size_changes": [change]}
    (run / "status.json").write_text(json.dumps(status))
    return run


def test_the_report_and_the_loss_plot_mark_each_change_of_world_size(tmp_path: Path):
    from kiln.plots import loss_figure, read_metrics
    from kiln.report import load_report

    run = _elastic_run(tmp_path)
    rows = dict(load_report(run).rows)
    assert rows["world size"] == "2 -> 1 at step 12 (node left)"
    assert rows["steps"].startswith("20 logged")  # the change is no step
    ax = loss_figure(read_metrics(run), "el").axes[0]
    marks = [c for c in ax.collections if c.get_label() == "world size"]
    assert len(marks) == 1
    assert [seg[0][0] for seg in marks[0].get_segments()] == [12]
    assert [t.get_text() for t in ax.texts] == ["2→1"]
    assert "world size" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_the_servers_job_says_its_world_size_and_its_changes(tmp_path: Path):
    from kiln.serve.store import JobRow
    from kiln.serve.views import describe

    run = _elastic_run(tmp_path)
    job = JobRow(id="j1", name="el", config={}, run_dir=str(run), state="running", created=0.0)
    shown = describe(job)
    assert shown["world_size"] == 1
    assert shown["world_size_changes"] == [
        {"step": 12, "from": 2, "to": 1, "reason": "node left", "time": 1.0}
    ]
    html = (ROOT / "kiln" / "serve" / "static" / "index.html").read_text()
    assert "worldText(j)" in html  # the job page shows them as they come


@pytest.mark.slow
def test_bad_input_on_a_rank_is_said_once_and_not_restarted(tmp_path: Path):
    """A rank that finds bad data exits 0 under torchrun's restarts (a restart would fail the
    same way); `kiln train --nproc` still says the line once and exits 2."""
    config = _config(tmp_path, "bad")
    (tmp_path / "train.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    env = {**gloo_env(), "LOGLEVEL": "INFO"}  # torchrun's agent tells each restart
    proc = subprocess.run(
        [sys.executable, "-m", "kiln", "-q", "train", str(config), "--nproc", "1",
         "--max-restarts", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [x for x in proc.stderr.splitlines() if x.startswith("kiln: error:")]
    assert len(errors) == 1
    assert "train.jsonl:2" in errors[0]
    assert "will restart worker group" not in proc.stderr
