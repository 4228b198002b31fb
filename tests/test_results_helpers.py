"""TrainResult as a table (best_epoch, throughput), and the public helper functions."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_config
from safetensors.torch import load_file
from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

import kiln
from kiln import Callback, KilnError, Trainer
from kiln.config import RunConfig
from kiln.optim import build_optimizer, schedule_for


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Trainer, kiln.TrainResult, list]:
    from helpers import make_rows, write_jsonl

    tmp = tmp_path_factory.mktemp("two_epochs")
    train = write_jsonl(tmp / "train.jsonl", make_rows(60, seed=1))
    val = write_jsonl(tmp / "val.jsonl", make_rows(12, seed=2))
    cfg = tiny_config(
        tmp,
        train,
        val,
        train={"max_steps": None, "num_epochs": 2, "batch_size": 16},
        eval={"every_epochs": 1},
        checkpoint={"every_epochs": 1, "every_minutes": None, "keep_last": 5},
        log={"every_steps": 2},
    )
    seen: list[dict] = []

    class Watch(Callback):
        def on_log(self, run, metrics) -> None:
            seen.append(dict(run.throughput))

    trainer = Trainer(cfg, callbacks=[Watch()])
    return trainer, trainer.fit(), seen


def test_table_has_every_logged_row_with_step_epoch_split(two_epochs) -> None:
    _, result, _ = two_epochs
    logged = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = result.table(as_records=True)
    assert [(r["step"], r["split"]) for r in records] == [(r["step"], r["split"]) for r in logged]
    for row, raw in zip(records, logged, strict=True):
        assert {k: row[k] for k in raw} == raw  # every metric as logged
    vals = [r for r in records if r["split"] == "val"]
    assert [r["val_loss"] for r in vals] == [m["val_loss"] for m in result.metrics]
    assert [r["epoch"] for r in vals] == [1, 2]
    frame = result.table()
    assert list(frame.columns[:3]) == ["step", "epoch", "split"]
    assert len(frame) == len(records)
    assert frame.loc[frame.split == "val", "val_loss"].tolist() == [r["val_loss"] for r in vals]


def test_table_without_pandas_is_records(two_epochs, monkeypatch: pytest.MonkeyPatch) -> None:
    _, result, _ = two_epochs
    monkeypatch.setitem(sys.modules, "pandas", None)  # `import pandas` raises ImportError
    assert result.table() == result.table(as_records=True)


def test_best_epoch_is_the_epoch_of_the_best_step(two_epochs) -> None:
    _, result, _ = two_epochs
    vals = [r for r in result.records() if r["split"] == "val"]
    best = min(vals, key=lambda r: r["val_loss"])
    assert (result.best_step, result.best_epoch) == (best["step"], best["epoch"])


def test_throughput_during_and_after(two_epochs) -> None:
    trainer, result, seen = two_epochs
    during = [s for s in seen if s]
    assert during
    assert all(s["tokens_per_s"] > 0 and s["samples_per_s"] > 0 for s in during)
    last_train = [r for r in result.records() if r["split"] == "train"][-1]
    assert trainer.throughput["tokens_per_s"] == last_train["tokens_per_s"]
    after = result.throughput
    assert after["tokens_per_s"] == result.summary["tokens_per_s"] > 0
    assert after["last_tokens_per_s"] == last_train["tokens_per_s"]
    assert after["wall_time_s"] > 0


def test_perplexity_is_the_logged_val_ppl_and_never_overflows(two_epochs) -> None:
    _, result, _ = two_epochs
    for row in result.metrics:
        assert kiln.perplexity(row["val_loss"]) == row["val_ppl"]
    assert kiln.perplexity(2.0) == math.exp(2.0)
    assert kiln.perplexity(1e6) == math.exp(50.0)
    assert math.isnan(kiln.perplexity(math.nan))


def test_grad_norm_is_what_clipping_measures() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    model[2].bias.requires_grad_(False)
    model(torch.randn(4, 8)).pow(2).sum().backward()
    want = torch.nn.utils.clip_grad_norm_(
        [p for p in model.parameters() if p.grad is not None], 1e9
    )
    assert kiln.grad_norm(model) == pytest.approx(float(want), rel=1e-6)
    assert kiln.grad_norm(model.parameters(), norm_type=1.0) == pytest.approx(
        sum(p.grad.abs().sum().item() for p in model.parameters() if p.grad is not None), rel=1e-6
    )
    assert kiln.grad_norm(torch.nn.Linear(2, 2)) == 0.0  # no gradients yet


def test_memory_stats_report_peak_and_rss() -> None:
    stats = kiln.memory_stats("cpu")
    assert stats["peak_mb"] > 10
    if Path("/proc/self/statm").is_file():
        assert 10 < stats["rss_mb"] <= stats["peak_mb"] + 1


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "cosine_restarts", "constant"])
def test_lr_scheduler_follows_kilns_schedule(scheduler: str) -> None:
    cfg = RunConfig(
        optim={
            "lr": 1e-3,
            "scheduler": scheduler,
            "warmup_ratio": 0.1,
            "min_lr_ratio": 0.1,
            "num_cycles": 2,
        }
    )
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr)
    sched = kiln.lr_scheduler(optimizer, cfg, total_steps=40)
    kilns = schedule_for(cfg.optim, 40)
    for step in range(40):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * kilns(step), rel=1e-12)
        optimizer.step()
        sched.step()


@pytest.mark.parametrize(
    ("scheduler", "hf"),
    [("cosine", get_cosine_schedule_with_warmup), ("linear", get_linear_schedule_with_warmup)],
)
def test_lr_scheduler_equals_transformers_without_warmup(scheduler: str, hf) -> None:
    # kiln's warmup counts step 0 as a warmup step ((step + 1) / warmup); after it, and
    # without it, the shapes are transformers' own.
    cfg = RunConfig(optim={"lr": 1e-3, "scheduler": scheduler})
    ours = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    theirs = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    a, b = kiln.lr_scheduler(ours, cfg.optim, 30), hf(theirs, 0, 30)
    for _ in range(30):
        assert ours.param_groups[0]["lr"] == pytest.approx(theirs.param_groups[0]["lr"], abs=1e-15)
        ours.step(), theirs.step(), a.step(), b.step()


def test_load_checkpoint_into_your_own_model_and_optimizer(two_epochs) -> None:
    trainer, result, _ = two_epochs
    ckpt = result.checkpoint_paths[0]
    fresh = Trainer(trainer.cfg.replace(output_dir=str(result.run_dir.parent / "other")))
    model = fresh.setup().model  # built as the run built it, with fresh weights
    opt = build_optimizer(model, lr=trainer.cfg.optim.lr, weight_decay=0.01)
    info = kiln.load_checkpoint(ckpt, model, opt)
    assert info["path"] == ckpt
    assert info["step"] == int(ckpt.name.split("-")[1])
    saved = load_file(str(ckpt / "model.safetensors"))
    for name, tensor in saved.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    for key, value in saved_opt["state"][0].items():
        assert torch.equal(opt.state_dict()["state"][0][key], value), key
    # A run directory means its newest checkpoint; final/ loads the weights alone.
    assert kiln.load_checkpoint(result.run_dir, model)["path"] == result.checkpoint_paths[-1]
    assert kiln.load_checkpoint(result.final_dir, model)["step"] is None
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name


def test_load_checkpoint_refuses_in_one_line(two_epochs, tmp_path: Path) -> None:
    trainer, result, _ = two_epochs
    with pytest.raises(KilnError, match="not a kiln run directory, checkpoint or final/"):
        kiln.load_checkpoint(tmp_path, trainer.model)
    bad = tmp_path / "checkpoints" / "step-1"
    bad.mkdir(parents=True)
    (bad / "manifest.json").write_text("{}")
    with pytest.raises(KilnError, match="not a complete kiln checkpoint"):
        kiln.load_checkpoint(bad, trainer.model)
    other = torch.nn.Linear(3, 3)
    with pytest.raises(KilnError, match="does not match the saved weights"):
        kiln.load_checkpoint(result.final_dir, other)


def test_lr_scheduler_starts_at_a_resumed_step_from_the_configs_peak() -> None:
    cfg = RunConfig(optim={"lr": 1e-3, "scheduler": "cosine", "warmup_steps": 2})
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.5)  # e.g. a loaded LR
    sched = kiln.lr_scheduler(optimizer, cfg, total_steps=10, start_step=4)
    kilns = schedule_for(cfg.optim, 10)
    for step in range(4, 10):
        assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * kilns(step), rel=1e-12)
        optimizer.step()
        sched.step()
    with pytest.raises(KilnError, match=r"start_step: must be in \[0, total_steps \(10\)\]"):
        kiln.lr_scheduler(optimizer, cfg, total_steps=10, start_step=11)
