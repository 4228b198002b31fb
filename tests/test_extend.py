"""Warmup as a fraction of the run, and extending a run: no duplicate rows, a logged LR jump."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from helpers import StopAt, tiny_config

from kiln import Trainer
from kiln.cli import main
from kiln.config import ConfigError, RunConfig, load_config
from kiln.explain import explain
from kiln.optim import lr_multiplier

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("ratio", "total", "steps"),
    [(0.05, 2000, 100), (0.085, 350, 30), (0.1, 25, 3), (0.0, 9, 0), (0.085, 1, 0), (0.5, 2, 1)],
)
def test_warmup_ratio_is_ceil_of_the_fraction_as_in_hf(ratio: float, total: int, steps: int):
    assert RunConfig(optim={"warmup_ratio": ratio}).optim.warmup_for(total) == steps


def test_warmup_steps_and_ratio_together_is_one_error() -> None:
    with pytest.raises(ConfigError) as info:
        RunConfig(optim={"warmup_ratio": 0.1, "warmup_steps": 3})
    assert info.value.problems == [
        "optim.warmup_ratio: set optim.warmup_steps or optim.warmup_ratio, not both (got 3 and 0.1)"
    ]


def test_a_later_layer_setting_one_warmup_key_replaces_the_other() -> None:
    quick = ROOT / "configs" / "quickstart.yaml"
    assert load_config(quick).optim.warmup_ratio == 0.085
    cfg = load_config(quick, ["optim.warmup_steps=5"])  # an override over the file
    assert (cfg.optim.warmup_steps, cfg.optim.warmup_ratio) == (5, None)
    back = cfg.replace(**{"optim.warmup_ratio": 0.2})  # a Python edit
    assert (back.optim.warmup_steps, back.optim.warmup_ratio) == (0, 0.2)
    preset = RunConfig(preset="baseline", optim={"warmup_ratio": 0.1})  # the file over a preset
    assert (preset.optim.warmup_steps, preset.optim.warmup_ratio) == (0, 0.1)


def test_a_short_try_of_the_shipped_t5_config_validates(capsys: pytest.CaptureFixture) -> None:
    t5 = str(ROOT / "configs" / "recipe_t5.yaml")
    assert main(["config", "validate", t5, "train.max_steps=20"]) == 0
    text = explain(load_config(t5, ["train.max_steps=20"]))
    assert "warmup steps:              2 (0.083 x 20)" in text
    assert "warmup steps:              50 (0.083 x 600)" in explain(load_config(t5))


def test_training_follows_the_ratio_warmup(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        optim={"lr": 1e-3, "warmup_steps": 0, "warmup_ratio": 0.25},
        train={"max_steps": 10},
        log={"every_steps": 1},
    )
    result = Trainer(cfg).fit()
    lrs = [r["lr"] for r in result.records() if r["split"] == "train"]
    want = [
        1e-3
        * lr_multiplier(
            s, scheduler="cosine", warmup_steps=3, total_steps=10, min_lr_ratio=0.0, num_cycles=1
        )
        for s in range(10)
    ]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert lrs[2] == pytest.approx(1e-3)  # the third step ends the warmup of ceil(2.5) = 3


def test_pause_resume_extend_logs_each_row_once_and_the_lr_jump(
    tmp_path: Path, recipe_files, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 8},
        eval={"every_steps": 4},
        checkpoint={"every_steps": 4},
        log={"every_steps": 2},
    )
    assert Trainer(cfg, callbacks=[StopAt(8)]).fit().status == "paused"  # validation cut
    assert Trainer(cfg, resume=True).fit().status == "finished"  # validates step 8
    longer = cfg.replace(**{"train.max_steps": 16})
    with caplog.at_level(logging.INFO, logger="kiln"):
        result = Trainer(longer, resume=True).fit()  # from step-8, validation still pending
    rows = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["split"], r["step"]) for r in rows]
    assert keys == [
        ("train", 2),
        ("train", 4),
        ("val", 4),
        ("train", 6),
        ("train", 8),
        ("val", 8),
        ("train", 10),
        ("train", 12),
        ("val", 12),
        ("train", 14),
        ("train", 16),
        ("val", 16),
    ]
    shape = {"scheduler": "cosine", "warmup_steps": 2, "min_lr_ratio": 0.0, "num_cycles": 1}
    before = 3e-3 * lr_multiplier(8, total_steps=8, **shape)
    after = 3e-3 * lr_multiplier(8, total_steps=16, **shape)
    assert before == 0.0
    assert (
        f"the cosine LR schedule re-stretched over 16 steps (was 8): step 9 runs at LR "
        f"{after:.3e} (the checkpoint's schedule: {before:.3e})"
    ) in caplog.messages
    step10 = next(r for r in result.records() if r["step"] == 10 and r["split"] == "train")
    assert step10["lr"] == pytest.approx(3e-3 * lr_multiplier(9, total_steps=16, **shape))
