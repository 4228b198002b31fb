"""The run as a job: status.json while it runs and after, typed stops, stable callback state,
and runs that leave the process as they found it."""

from __future__ import annotations

import itertools
import json
import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from helpers import make_rows, start_train, tiny_config, tiny_raw, write_jsonl

from kiln import Callback, StopRequest, Trainer
from kiln.callbacks.early_stop import EarlyStopping
from kiln.config import load_config
from kiln.job import job_callbacks
from kiln.rank import RankContext
from kiln.runs import read_status

# ---- status.json -------------------------------------------------------------------------------


def test_status_of_a_finished_run(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 6})
    result = Trainer(cfg).fit()
    status = read_status(cfg.run_dir)
    assert status is not None
    assert (status["state"], status["exit_code"], status["stop"]) == ("finished", 0, None)
    assert (status["step"], status["total_steps"]) == (6, 6)
    assert status["train"]["step"] == 6
    assert status["val"]["val_loss"] == result.metrics[-1]["val_loss"]
    assert status["tokens"] == result.summary["tokens"]
    assert status["heartbeat"] >= status["started_at"]
    assert status["eta_s"] == 0.0
    assert result.status == "finished"


@pytest.mark.slow
def test_status_while_running_then_paused_by_sigterm(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", make_rows(200, seed=4))
    raw = tiny_raw(tmp_path, data, None, train={"max_steps": 100_000, "batch_size": 4})
    raw["log"]["every_steps"] = 2
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = Path(raw["output_dir"])
    proc = start_train(config)
    try:
        deadline = time.monotonic() + 240
        seen: list[dict[str, Any]] = []
        while len(seen) < 6:  # six reads at moments unrelated to the run's log steps
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the run never reported running"
            status = read_status(run)
            if status is not None and status["state"] == "running" and status["step"] >= 4:
                seen.append({**status, "read_at": time.time()})
            time.sleep(0.37)
        records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        elapsed = [r["elapsed_s"] for r in records if r["split"] == "train"]
        interval = max(b - a for a, b in itertools.pairwise(elapsed))
        for status in seen:
            assert status["pid"] == proc.pid
            assert status["total_steps"] == 100_000
            assert status["eta_s"] is not None
            assert status["eta_s"] > 0
            age = status["read_at"] - status["heartbeat"]
            assert age < 2 * interval + 0.5, (age, interval)  # younger than two log intervals
        assert seen[-1]["step"] > seen[0]["step"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, err
    status = read_status(run)
    assert status is not None
    assert (status["state"], status["exit_code"]) == ("paused", 3)
    assert status["stop"]["kind"] == "signal"
    assert status["step"] == max(r["step"] for r in records) or status["step"] > 0


def test_status_of_a_run_that_failed_on_a_bad_row(tmp_path: Path) -> None:
    from kiln.cli import main

    data = write_jsonl(tmp_path / "train.jsonl", make_rows(40))
    with data.open("a") as f:
        f.write("{broken\n")
    raw = tiny_raw(tmp_path, data, None)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert main(["-q", "train", str(config)]) == 2
    status = read_status(Path(raw["output_dir"]))
    assert status is not None
    assert (status["state"], status["exit_code"]) == ("failed", 2)
    assert f"{data}:41: invalid JSON" in status["error"]


# ---- typed stops -------------------------------------------------------------------------------


class _Prune(Callback):
    """Prunes the run after its validation at `step`, as a sweep would."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.validations: list[int] = []
        self.checkpoints: list[tuple[int, str]] = []

    def on_validation_end(self, run: Any, metrics: dict[str, float]) -> None:
        self.validations.append(run.state.step)
        if run.state.step == self.step:
            run.control.request_stop(
                StopRequest("pruned", "trial pruned", resumable=False, write_final=False)
            )

    def on_checkpoint(self, run: Any, path: Path, kind: str) -> None:
        self.checkpoints.append((run.state.step, kind))


def test_a_pruned_stop_checkpoints_without_validation_or_final(
    tmp_path: Path, recipe_files
) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, eval={"every_steps": 4})
    prune = _Prune(8)
    result = Trainer(cfg, callbacks=[prune]).fit()
    assert prune.validations == [4, 8]  # no extra validation after the prune
    assert [m["step"] for m in result.metrics] == [4, 8]
    assert result.final_dir is None
    assert not (cfg.run_dir / "final").exists()
    assert prune.checkpoints == [(8, "pause")]  # a resumable checkpoint, and it says why
    assert (result.status, result.stop.kind) == ("stopped", "pruned")  # type: ignore[union-attr]
    status = read_status(cfg.run_dir)
    assert status is not None
    assert (status["state"], status["exit_code"]) == ("stopped", 3)
    assert status["stop"] == {"kind": "pruned", "reason": "trial pruned"}
    summary = json.loads((cfg.run_dir / "summary.json").read_text())
    assert summary["stop"] == {"kind": "pruned", "reason": "trial pruned"}


def test_early_stopping_is_told_by_its_kind_not_its_text(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        # Improving by more than 100 nats is impossible: the second validation stops the run.
        eval={
            "every_steps": 2,
            "early_stopping": {"enabled": True, "patience": 1, "min_delta": 100},
        },
    )
    kinds: list[str] = []

    class Kinds(Callback):
        def on_checkpoint(self, run: Any, path: Path, kind: str) -> None:
            kinds.append(kind)

    result = Trainer.from_config(cfg, callbacks=[Kinds()]).fit()
    assert result.stop is not None
    assert result.stop.kind == "early_stop"
    assert result.summary["steps"] == 4
    assert result.status == "finished"
    assert result.final_dir is not None  # early stopping ends the run with a model
    assert kinds[-1] == "final"
    status = read_status(cfg.run_dir)
    assert status is not None
    assert status["stop"]["kind"] == "early_stop"
    assert (status["state"], status["eta_s"]) == ("finished", 0.0)


def test_callback_state_follows_its_name_not_its_position(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, eval={"every_steps": 2})

    class Pause(Callback):
        def on_step_end(self, run: Any) -> None:
            if run.state.step == 6:
                run.control.request_stop(StopRequest("requested", "pause", resumable=True))

    class Stateful(Callback):
        state_key = "my_counter"

        def __init__(self) -> None:
            self.n = 0

        def on_step_end(self, run: Any) -> None:
            self.n += 1

        def state_dict(self) -> dict[str, Any]:
            return {"n": self.n}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            self.n = state["n"]

    early = EarlyStopping(patience=50)
    Trainer(cfg, callbacks=[early, Stateful(), Pause()]).fit()
    assert early.best is not None
    # Resume with another callback in front and the order changed: each finds its own state.
    early2, counter = EarlyStopping(patience=50), Stateful()
    Trainer(cfg, callbacks=[Callback(), counter, early2], resume=True).fit()
    assert counter.n == 20  # 6 before the pause + 14 after
    assert early2.best is not None
    assert early2.best <= early.best


# ---- process hygiene ---------------------------------------------------------------------------


def _global_state() -> dict[str, Any]:
    import random

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state()[1].tolist(),
        "torch": torch.get_rng_state(),
        "threads": torch.get_num_threads(),
        "tf32": (
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        ),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)},
        "handlers": (list(logging.getLogger().handlers), list(logging.getLogger("kiln").handlers)),
        "live_threads": {t for t in threading.enumerate() if not t.daemon},
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.slow
def test_three_fits_with_every_default_callback_are_identical_and_leave_no_trace(
    tmp_path: Path, recipe_files
) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    raw = tiny_raw(
        tmp_path,
        *recipe_files,
        train={"max_steps": 12, "num_threads": 1},
        eval={"every_steps": 4, "early_stopping": {"enabled": True, "patience": 5}},
        log={"progress": "plain", "plots": True, "loggers": ["tensorboard"]},
        checkpoint={"every_steps": 4},
    )
    cfg = load_config(data=raw)
    callbacks = job_callbacks(cfg, (), RankContext())  # built once, used by all three runs
    names = {type(cb).__name__ for cb in callbacks}
    assert {"ProgressCallback", "EarlyStopping", "TrackingCallback", "PlotsCallback"} <= names
    torch.manual_seed(1234)
    before = _global_state()
    runs = []
    for i in range(3):
        run_cfg = load_config(data={**raw, "output_dir": str(tmp_path / f"run{i}")})
        runs.append(Trainer(run_cfg, callbacks=callbacks).fit())
        _same(before, _global_state())  # RNGs, threads, TF32, handlers, no stray threads
    assert runs[0].loss_history == runs[1].loss_history == runs[2].loss_history
    assert runs[0].metrics == runs[1].metrics == runs[2].metrics
    for result in runs:
        assert (result.run_dir / "plots" / "loss.png").is_file()
        assert any((result.run_dir / "tensorboard").rglob("events.out.tfevents.*"))
