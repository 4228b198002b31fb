"""Validation and checkpoint cadence: by step, by epoch, and checkpoints by time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_config

from kiln import Callback, Trainer
from kiln.config import ConfigError, RunConfig
from kiln.engine import cadence

MINUTES_PER_STEP = 4.0


class Clock(Callback):
    """A fake training clock: each step takes MINUTES_PER_STEP."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 0.0
        monkeypatch.setattr(cadence, "monotonic", lambda: self.now)

    def on_step_end(self, run) -> None:
        self.now += 60.0 * MINUTES_PER_STEP


def _steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))


def _losses(run_dir: Path) -> list[tuple]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["split"], r["loss"]) for r in rows]


def _cfg(tmp_path: Path, files, name: str, **checkpoint):
    return tiny_config(
        tmp_path / name,
        *files,
        train={"max_steps": 10},
        eval={"every_steps": 5},
        checkpoint={"keep_last": 10, **checkpoint},
        log={"every_steps": 1},
    )


def test_time_based_checkpoints_bound_lost_work_and_change_nothing(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    timed = Trainer(
        _cfg(tmp_path, recipe_files, "timed", every_minutes=10.0), callbacks=[Clock(monkeypatch)]
    )
    timed_result = timed.fit()
    # 4 minutes a step: 12 minutes after step 3, then 12 more after step 6 and step 9.
    assert _steps(timed_result.run_dir) == [3, 6, 9]
    plain = Trainer(_cfg(tmp_path, recipe_files, "plain", every_minutes=None))
    plain_result = plain.fit()
    assert _steps(plain_result.run_dir) == []
    assert _losses(timed_result.run_dir) == _losses(plain_result.run_dir)
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, timed.model.state_dict()[name]), name
    # A resume from a time-based checkpoint ends where the uninterrupted run did.
    resumed = Trainer(
        _cfg(tmp_path, recipe_files, "timed", every_minutes=None),
        resume=timed_result.run_dir / "checkpoints" / "step-6",
    )
    assert resumed.fit().loss_history == plain_result.loss_history
    for name, tensor in plain.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


def test_a_checkpoint_of_another_kind_restarts_the_clock(
    tmp_path: Path, recipe_files, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = _cfg(tmp_path, recipe_files, "mixed", every_minutes=10.0, every_steps=2)
    result = Trainer(cfg, callbacks=[Clock(monkeypatch)]).fit()
    assert _steps(result.run_dir) == [2, 4, 6, 8, 10]  # never 10 minutes without one


class EpochEnds(Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_epoch_end(self, run) -> None:
        self.steps.append(run.state.step)


def test_every_epochs_validates_and_checkpoints_at_epoch_ends(tmp_path: Path, recipe_files):
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": None, "num_epochs": 4, "batch_size": 16},
        eval={"every_epochs": 1},
        checkpoint={"every_epochs": 2, "keep_last": 10, "every_minutes": None},
        log={"every_steps": 1},
    )
    ends = EpochEnds()
    result = Trainer(cfg, callbacks=[ends]).fit()
    assert len(ends.steps) == 4  # the batch that ends an epoch ends its step
    assert ends.steps[-1] == result.summary["steps"]
    val_steps = [r["step"] for r in result.records() if r["split"] == "val"]
    assert val_steps == ends.steps  # the last is also the end of training: validated once
    assert _steps(result.run_dir) == [ends.steps[1], ends.steps[3]]  # every 2nd epoch
    assert [r["epoch"] for r in result.records() if r["split"] == "val"] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("checkpoint.every_minutes", 0, "checkpoint.every_minutes: input should be greater than 0"),
        ("checkpoint.every_epochs", 0, "checkpoint.every_epochs: input should be greater than 0"),
        ("eval.every_epochs", -1, "eval.every_epochs: input should be greater than 0"),
    ],
)
def test_bad_cadence_is_one_line_naming_the_key(key: str, value: int, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig().replace(**{key: value})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(message)


def test_the_default_checkpoints_every_30_minutes() -> None:
    assert RunConfig().checkpoint.every_minutes == 30.0
