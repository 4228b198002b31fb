"""Issue 26 item 27: the config is the source of truth whichever entry point builds the trainer.

`Trainer(cfg, model=..., tokenizer=..., train_data=..., val_data=...)` runs what the config asks
for (progress, early stopping, trackers, notifications, plots, export on finish), as
`Trainer.from_config(cfg)` and `kiln train` do; `callbacks=[...]` adds to it, and
`config_callbacks=False` leaves the config's out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from helpers import bpe_tokenizer, make_rows, tiny_raw

from kiln import Callback, Trainer
from kiln.config import load_config

ROWS = make_rows(40, seed=5)
VAL = make_rows(8, seed=6)


def _model_and_tokenizer() -> tuple[Any, Any]:
    """A tiny GPT-2 and a BPE tokenizer built by the user, not by kiln."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = bpe_tokenizer([r["text"] for r in ROWS])
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64)
    return GPT2LMHeadModel(config), tokenizer


def _cfg(tmp_path: Path, **sections: Any) -> Any:
    """A config that asks for early stopping (stops at step 4: the second validation cannot
    beat the first by 100), a TensorBoard tracker and plots."""
    raw = tiny_raw(
        tmp_path,
        tmp_path / "unused.jsonl",
        None,
        train={"max_steps": 6, "batch_size": 4, "num_threads": 1},
        eval={
            "every_steps": 2,
            "early_stopping": {"enabled": True, "patience": 1, "min_delta": 100},
        },
        log={"every_steps": 2, "progress": "none", "plots": True, "loggers": ["tensorboard"]},
        **sections,
    )
    del raw["data"]["train"]  # the data is given in Python
    return load_config(data=raw, complete=False)


class Seen(Callback):
    """A user's callback: records the validation steps it saw."""

    def __init__(self) -> None:
        self.validations: list[int] = []

    def on_validation_end(self, run: Any, metrics: dict[str, float]) -> None:
        self.validations.append(run.state.step)


def _fit(cfg: Any, **kwargs: Any) -> tuple[Trainer, Any]:
    model, tokenizer = _model_and_tokenizer()
    trainer = Trainer(
        cfg, model=model, tokenizer=tokenizer, train_data=ROWS, val_data=VAL, **kwargs
    )
    return trainer, trainer.fit()


@pytest.mark.slow
def test_item27_trainer_constructor_runs_what_the_config_asks(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    pytest.importorskip("matplotlib")
    seen = Seen()
    trainer, result = _fit(_cfg(tmp_path), callbacks=[seen])
    run = result.run_dir
    assert result.stop is not None
    assert result.stop.kind == "early_stop"
    assert trainer.state.step == 4
    assert seen.validations == [2, 4]  # the user's callback ran too: added, not replacing
    assert (run / "plots" / "loss.png").is_file()
    assert any((run / "tensorboard").rglob("events.out.tfevents.*"))
    names = [type(cb).__name__ for cb in trainer.callbacks]
    assert names[0] == "Seen"  # the caller's first, then the config's
    assert {"ProgressCallback", "EarlyStopping", "PlotsCallback", "TrackingCallback"} <= set(names)


def test_item27_config_callbacks_false_leaves_the_configs_out(tmp_path: Path) -> None:
    seen = Seen()
    trainer, result = _fit(_cfg(tmp_path), callbacks=[seen], config_callbacks=False)
    run = result.run_dir
    assert trainer.callbacks == [seen]
    assert result.stop is None
    assert trainer.state.step == 6
    assert seen.validations == [2, 4, 6]
    assert not (run / "plots").exists()
    assert not (run / "tensorboard").exists()


def test_item27_every_entry_point_builds_the_same_callbacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("tensorboard")
    monkeypatch.setenv("KILN_WEBHOOK_URL", "http://127.0.0.1:9/hook")
    cfg = _cfg(
        tmp_path,
        notify={"senders": [{"kind": "webhook"}]},
        export={"on_finish": True},
    )
    expected = [
        "ProgressCallback",
        "EarlyStopping",
        "PlotsCallback",
        "TrackingCallback",
        "NotifyCallback",
        "ExportOnFinish",
    ]
    seen = Seen()
    for build in (Trainer, Trainer.from_config):
        trainer = build(cfg, callbacks=[seen])
        assert [type(cb).__name__ for cb in trainer.callbacks] == ["Seen", *expected]
        trainer = build(cfg, callbacks=[seen], config_callbacks=False)
        assert trainer.callbacks == [seen]
    # A caller's callback of a class the config also builds takes that one's place.
    mine = type(Trainer(cfg).callbacks[1])(patience=7)
    names = Trainer(cfg, callbacks=[mine]).callbacks
    assert names[0] is mine
    assert sum(type(cb) is type(mine) for cb in names) == 1
