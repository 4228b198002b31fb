"""The training loop: accumulation equivalence, events, end-to-end training, the run directory."""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from kiln import Callback, Event, StopRequest, Trainer
from kiln.engine.loss import count_targets, forward_loss_sum
from kiln.models import train_bpe_tokenizer


class Recorder(Callback):
    """Records every event; keeps a copy of the gradients at the first optimizer step."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.grads: dict[str, torch.Tensor] | None = None

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("on_") and name != "on_optimizer_step_begin":
            events = object.__getattribute__(self, "events")
            return lambda trainer, **kw: events.append(name[3:])
        return object.__getattribute__(self, name)

    def on_optimizer_step_begin(self, trainer: Trainer) -> None:
        self.events.append("optimizer_step_begin")
        if self.grads is None:
            self.grads = {
                n: p.grad.detach().clone()
                for n, p in trainer.model.named_parameters()
                if p.grad is not None
            }


def test_every_event_has_a_callback_method_and_back() -> None:
    methods = {
        name
        for name, _ in inspect.getmembers(Callback, inspect.isfunction)
        if name.startswith("on_")
    }
    assert methods == {e.method for e in Event}


def _tiny_model(vocab: int) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return train_bpe_tokenizer(["Title: Rice\nSteps:\n1. Rinse the rice."] * 10, vocab_size=300)


def test_grad_accumulation_matches_one_big_batch(tmp_path: Path, recipe_files, tokenizer) -> None:
    """k=2 x b=2 gives the gradients of 1 x 4, with unequal sequence lengths per micro-batch."""
    g = torch.Generator().manual_seed(0)
    # Micro-batch 1 holds long sequences, micro-batch 2 short ones: the per-micro-batch mean
    # loss would weight their tokens differently; the window-token-weighted one must not.
    lengths = [40, 30, 6, 3]
    data = [torch.randint(0, 250, (n,), generator=g).tolist() for n in lengths]
    grads = []
    for batch, accum in ((4, 1), (2, 2)):
        cfg = tiny_config(
            tmp_path / f"{batch}x{accum}",
            *recipe_files,
            train={
                "max_steps": 1,
                "batch_size": batch,
                "grad_accum_steps": accum,
                "grad_clip": None,
            },
            optim={"warmup_steps": 0},
            data={"val_split": 0.0},  # all 4 sequences train (Python data is split like files)
        )
        rec = Recorder()
        trainer = Trainer(
            cfg,
            model=_tiny_model(len(tokenizer)),
            tokenizer=tokenizer,
            train_data=data,
            callbacks=[rec],
        )
        trainer.fit()
        grads.append(rec.grads)
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=0, msg=name)


def test_window_loss_is_token_weighted(tokenizer) -> None:
    model = _tiny_model(len(tokenizer)).eval()
    a = {"input_ids": torch.randint(0, 250, (1, 20))}
    b = {"input_ids": torch.randint(0, 250, (1, 4))}
    for x in (a, b):
        x["labels"] = x["input_ids"]
    sums = [forward_loss_sum(model, x, "causal_lm")[0] for x in (a, b)]
    counts = [count_targets(x, "causal_lm") for x in (a, b)]
    assert counts == [19, 3]
    logits = [model(x["input_ids"]).logits[0, :-1] for x in (a, b)]
    targets = [x["input_ids"][0, 1:] for x in (a, b)]
    ref = torch.nn.functional.cross_entropy(torch.cat(logits), torch.cat(targets))
    torch.testing.assert_close((sums[0] + sums[1]) / sum(counts), ref)


def test_events_fire_in_documented_order(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 4, "batch_size": 4, "grad_accum_steps": 2},
        eval={"every_steps": 2, "max_batches": 1},
        log={"every_steps": 2},
    )
    rec = Recorder()
    Trainer(cfg, callbacks=[rec]).fit()
    window = ["backward_begin", "backward_end"] * 2
    step = ["step_begin", *window, "optimizer_step_begin", "optimizer_step_end", "step_end"]
    val = ["validation_begin", "validation_end", "log"]
    window_pair = [*step, *step, "log", *val]
    expected = ["train_begin", "epoch_begin", *window_pair, *window_pair, "checkpoint", "train_end"]
    assert rec.events == expected


def test_end_to_end_trains_and_writes_the_run_dir(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 40, "batch_size": 8},
        eval={"every_steps": 20, "sample_prompt": "Title:", "sample_max_new_tokens": 8},
        log={"every_steps": 10},
    )
    trainer = Trainer.from_config(cfg)
    result = trainer.fit()
    run = tmp_path / "run"
    assert {"config.yaml", "metrics.jsonl", "summary.json", "final"} <= {
        p.name for p in run.iterdir()
    }
    assert len(result.loss_history) == 40
    assert sum(result.loss_history[-5:]) / 5 < sum(result.loss_history[:5]) / 5 - 0.5
    assert [m["step"] for m in result.metrics] == [20, 40]
    assert result.metrics[-1]["val_loss"] < result.metrics[0]["val_loss"]
    assert result.best_step == 40
    assert result.sample is not None
    assert result.sample.startswith("Title:")

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [10, 20, 30, 40]
    assert all({"loss", "lr", "tokens_per_s", "grad_norm"} <= r.keys() for r in records[:1])
    logged = [r["loss"] for r in records if r["split"] == "train"]
    expected = [sum(result.loss_history[i : i + 10]) / 10 for i in range(0, 40, 10)]
    assert logged == pytest.approx(expected)

    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40
    assert summary["best_metric"]["step"] == 40
    assert summary["final_val"]["val_loss"] == pytest.approx(result.metrics[-1]["val_loss"])

    # final/ loads with transformers alone and gives the same logits.
    model = AutoModelForCausalLM.from_pretrained(run / "final").eval()
    tok = AutoTokenizer.from_pretrained(run / "final")
    ids = tok("Title: Lemon Rice", return_tensors="pt")["input_ids"]
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, trainer.model(ids).logits)


def test_refuses_to_clobber_a_run(tmp_path: Path, recipe_files) -> None:
    from kiln.errors import KilnError

    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 3})
    Trainer(cfg).fit()
    before = (tmp_path / "run" / "summary.json").read_text()
    with pytest.raises(KilnError, match="already holds a run"):
        Trainer(cfg).fit()
    assert (tmp_path / "run" / "summary.json").read_text() == before
    Trainer(cfg, overwrite=True).fit()


def test_request_stop_ends_early_and_writes_final(tmp_path: Path, recipe_files) -> None:
    class StopAt3(Callback):
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.state.step == 3:
                trainer.control.request_stop(StopRequest("requested", "test"))

    cfg = tiny_config(tmp_path, *recipe_files)
    result = Trainer(cfg, callbacks=[StopAt3()]).fit()
    assert result.summary["steps"] == 3
    assert result.summary["stop_reason"] == "test"
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_same_seed_same_losses(tmp_path: Path, recipe_files) -> None:
    runs = [
        Trainer(tiny_config(tmp_path / str(i), *recipe_files, train={"max_steps": 6})).fit()
        for i in range(2)
    ]
    assert runs[0].loss_history == runs[1].loss_history


def test_epochs_define_total_steps(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path, *recipe_files, train={"max_steps": None, "num_epochs": 2, "batch_size": 4}
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    per_epoch = len(trainer.train_data) // 4
    assert result.summary["steps"] == 2 * per_epoch
    assert trainer.state.epoch == 2


def test_seq2seq_t5_from_scratch_trains_and_reloads(tmp_path: Path, recipe_files) -> None:
    from transformers import AutoModelForSeq2SeqLM

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        task="seq2seq",
        model={"arch": "t5", "num_layers": 1},
        data={
            "source_template": "Title: {title}\nIngredients:\n{ingredients}",
            "target_template": "{steps}",
            "max_length": 48,
            "max_target_length": 32,
        },
        train={"max_steps": 30, "batch_size": 8},
        eval={"every_steps": 15, "sample_prompt": "Title: Rice", "sample_max_new_tokens": 5},
    )
    trainer = Trainer(cfg)
    result = trainer.fit()
    assert result.metrics[-1]["val_loss"] < result.metrics[0]["val_loss"]
    assert sum(result.loss_history[-5:]) < sum(result.loss_history[:5])
    assert isinstance(result.sample, str)
    model = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "run" / "final").eval()
    batch = {
        "input_ids": torch.randint(0, 250, (2, 10)),
        "labels": torch.randint(0, 250, (2, 6)),
    }
    trainer.model.eval()
    with torch.no_grad():
        ours = forward_loss_sum(trainer.model, batch, "seq2seq")[0]
        reloaded = forward_loss_sum(model, batch, "seq2seq")[0]
        # Parity with transformers' own loss (mean over label tokens).
        hf = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
    torch.testing.assert_close(ours, reloaded)
    torch.testing.assert_close(ours / batch["labels"].numel(), hf)


def test_keep_freed_memory_leaves_an_allocator_the_user_chose(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`kiln train` keeps glibc from trimming each step's memory (issue 29: 39k page faults a
    step on the quickstart model), unless the environment chose for itself."""
    import sys as _sys

    from kiln.process import keep_freed_memory

    for key in [k for k in os.environ if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("LD_PRELOAD", "")
    assert keep_freed_memory() is _sys.platform.startswith("linux")
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")  # arenas, not trimming: still ours
    assert keep_freed_memory() is _sys.platform.startswith("linux")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")  # the user's choice
    assert keep_freed_memory() is False
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0")
    assert keep_freed_memory() is False
    monkeypatch.delenv("GLIBC_TUNABLES")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/libjemalloc.so.2")
    assert keep_freed_memory() is False


def test_events_go_to_the_callbacks_that_handle_them() -> None:
    """`CallbackList.listening`: a callback is called for an event it does something on (its
    class overrides the no-op, or the instance sets it), in order; one appended later too."""
    from kiln.callbacks.base import CallbackList

    class Steps(Callback):
        def on_step_end(self, run: Any) -> None:
            """Handles the step's end (does nothing: only whether it is called matters)."""

    class Logs(Callback):
        def on_log(self, run: Any, metrics: dict[str, Any]) -> None:
            """Handles log records (does nothing: only whether it is called matters)."""

    class Inherits(Steps):
        """Handles the step's end through its base class."""

    plain, steps, logs, inherits, patched = Callback(), Steps(), Logs(), Inherits(), Callback()
    patched.on_step_end = lambda run: None  # type: ignore[method-assign]
    callbacks = CallbackList([plain, steps, logs, inherits, patched])
    assert callbacks.listening("on_step_end") == [steps, inherits, patched]
    assert callbacks.listening("on_log") == [logs]
    assert callbacks.listening("on_train_begin") == []
    late = Steps()
    callbacks.append(late)
    assert callbacks.listening("on_step_end") == [steps, inherits, patched, late]


def test_kiln_train_keeps_freed_memory_once_training_begins(
    tmp_path: Path, recipe_files: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`kiln train` pins the allocator for its process when training begins (after setup, whose
    freed memory is handed back first); a Trainer in a user's process leaves it alone."""
    import yaml

    import kiln.process
    from kiln.cli import main

    calls: list[int] = []

    def recorded() -> bool:
        calls.append(1)
        return True

    monkeypatch.setattr(kiln.process, "keep_freed_memory", recorded)
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 4, "batch_size": 2})
    Trainer(cfg).fit()
    assert calls == []
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert main(["-q", "train", str(path), "--overwrite"]) == 0
    assert calls == [1]
