"""Early stopping stops at the documented validation; final/ can be the best checkpoint."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file

from kiln import Trainer
from kiln.callbacks.early_stop import EarlyStopping
from kiln.engine.control import Control
from kiln.metrics import register_metric
from kiln.metrics.registry import METRICS


def _run(cb: EarlyStopping, values: list[float | None]) -> int | None:
    """Feed one validation per value (steps 1, 2, ...); the step at which a stop was asked."""
    run = SimpleNamespace(state=SimpleNamespace(step=0), control=Control())
    for step, value in enumerate(values, 1):
        run.state.step = step
        cb.on_validation_end(run, {} if value is None else {"val_loss": value})  # type: ignore[arg-type]
        if run.control.stop is not None:
            assert run.control.stop.kind == "early_stop"  # recognised by kind, not by text
            assert not run.control.stop.resumable
            assert run.control.stop.write_final
            return step
    return None


def test_stops_patience_validations_after_the_best() -> None:
    # Best at validation 2; 3 and 4 do not improve; patience 2 -> stop at validation 4.
    assert _run(EarlyStopping(patience=2), [3.0, 2.0, 2.5, 2.1, 1.0]) == 4
    # An improvement resets the count.
    assert _run(EarlyStopping(patience=2), [3.0, 3.1, 2.0, 2.2, 2.3, 0.1]) == 5
    # min_delta: 1.95 is not better than 2.0 by more than 0.1.
    assert _run(EarlyStopping(patience=1, min_delta=0.1), [2.0, 1.95]) == 2
    assert _run(EarlyStopping(patience=1, min_delta=0.01), [2.0, 1.95]) is None
    # mode max; validations without the metric neither improve nor count.
    cb = EarlyStopping(mode="max", patience=2)
    assert _run(cb, [0.1, 0.5, None, 0.4, None, 0.5, 0.9]) == 6
    assert (cb.best, cb.best_step, cb.stopped_step) == (0.5, 2, 6)


def test_state_round_trips_so_a_resume_stops_at_the_same_validation() -> None:
    cb = EarlyStopping(patience=3)
    assert _run(cb, [1.0, 1.5, 1.2]) is None
    resumed = EarlyStopping(patience=3)
    resumed.load_state_dict(cb.state_dict())
    assert _run(resumed, [1.1]) == 1  # the third validation without improvement
    with pytest.raises(ValueError, match="mode"):
        EarlyStopping(mode="best")


SCRIPT = [1.0, 3.0, 2.0, 2.5, 2.9, 5.0]  # val_scripted per validation: best at the 2nd


@pytest.fixture
def scripted_metric() -> Any:
    calls = {"n": 0}

    @register_metric("test_scripted")
    def scripted(samples):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return {"scripted": SCRIPT[calls["n"] - 1]}

    yield calls
    METRICS.pop("test_scripted")


@pytest.mark.slow
def test_early_stop_in_a_run_and_final_is_the_best_checkpoint(
    tmp_path: Path, recipe_files, scripted_metric
) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 40, "batch_size": 4},
        eval={
            "every_steps": 2,
            "max_batches": 1,
            "generate": {"num_samples": 1, "max_new_tokens": 1, "metrics": ["test_scripted"]},
            "early_stopping": {
                "enabled": True,
                "metric": "val_scripted",
                "mode": "max",
                "patience": 3,
            },
        },
        checkpoint={
            "keep_best": 1,
            "keep_last": 1,
            "metric": "val_scripted",
            "mode": "max",
            "final": "best",
            "every_steps": 5,
        },
    )
    trainer = Trainer.from_config(cfg)
    result = trainer.fit()
    # Best at validation 2 (step 4); validations 3, 4, 5 do not beat it: stop at step 10.
    assert result.summary["steps"] == 10
    assert [m["val_scripted"] for m in result.metrics] == SCRIPT[:5]
    assert result.summary["stop_reason"].startswith("early stopping: val_scripted")
    assert result.best_step == 4
    assert result.summary["final_weights"] == {"weights": "best", "step": 4, "val_scripted": 3.0}
    run = tmp_path / "run"
    # keep_best kept step 4 (saved when it became the best); keep_last the newest (every 5).
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-10", "step-4"]
    best = load_file(str(run / "checkpoints" / "step-4" / "model.safetensors"))
    last = load_file(str(run / "checkpoints" / "step-10" / "model.safetensors"))
    final = load_file(str(run / "final" / "model.safetensors"))
    name = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(best[name], last[name])
    for key, value in final.items():
        torch.testing.assert_close(value, best[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_final_best_on_val_loss_without_early_stopping(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 6, "batch_size": 4},
        optim={"lr": 0.5, "warmup_steps": 0},  # diverges: the first validation is the best
        eval={"every_steps": 2, "max_batches": 2},
        checkpoint={"keep_best": 1, "final": "best"},
    )
    result = Trainer.from_config(cfg).fit()
    losses = [m["val_loss"] for m in result.metrics]
    best_step = result.metrics[losses.index(min(losses))]["step"]
    assert result.summary["final_weights"]["step"] == best_step == result.best_step
    assert result.summary["steps"] == 6
