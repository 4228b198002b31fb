"""The first hour's rough edges (issue 15, items 4-13): stray third-party output, console
metrics and numbers, warnings a new user needs, checkpoint cadence, non-TTY progress."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from helpers import tiny_config

from kiln import Trainer

# ---- third-party output (item 6) -------------------------------------------------------------


def test_rouge_logs_nothing_under_kilns_prefix(caplog: pytest.LogCaptureFixture) -> None:
    pytest.importorskip("rouge_score")
    from kiln.metrics import text

    text._scorer.cache_clear()  # a cached scorer would not be built (nor log) again
    with caplog.at_level(logging.DEBUG):
        assert text.rouge(["a b c"], ["a b c"])["rouge1"] == 1.0
    assert [r.getMessage() for r in caplog.records] == []


def test_lora_run_and_merge_give_no_future_warning_nor_progress_bar(
    tmp_path: Path, recipe_files, capfd: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("peft")
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        lora={"enabled": True, "r": 2, "merge_on_finish": True},
        train={"max_steps": 3},
    )
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()  # the CLI tests turn the bars off for good
    hf_logging.enable_progress_bar()  # a Python user's default
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            Trainer(cfg).fit()
        assert hf_logging.is_progress_bar_enabled()  # the user's setting is left as it was
    finally:
        if not before:
            hf_logging.disable_progress_bar()
    assert [str(w.message) for w in caught if issubclass(w.category, FutureWarning)] == []
    assert (tmp_path / "run" / "final" / "merged" / "model.safetensors").is_file()
    assert "Writing model shards" not in capfd.readouterr().err


def test_plain_run_final_has_no_progress_bar_and_a_card_with_the_real_path(
    tmp_path: Path, recipe_files, capfd: pytest.CaptureFixture[str]
) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 3})
    Trainer(cfg).fit()
    assert "Writing model shards" not in capfd.readouterr().err
    final = (tmp_path / "run" / "final").resolve()
    card = (final / "README.md").read_text()
    assert "path/to/final" not in card
    assert f'M.from_pretrained("{final}")' in card
    assert f'AutoTokenizer.from_pretrained("{final}")' in card


# ---- numbers on the console (items 12, 13) ---------------------------------------------------


def test_format_metric_is_readable_for_huge_values() -> None:
    from kiln.metrics import format_metric

    assert format_metric(2957745137753336.5, 2) == "2.958e+15"
    assert format_metric(12.3456, 2) == "12.35"
    assert format_metric(0.5) == "0.5000"
    assert format_metric(None) == "n/a"
    assert format_metric(float("inf")) == "inf"


def test_generation_scores_say_their_scale() -> None:
    from kiln.metrics import generation_scores, metric_scale

    metrics = {
        "val_loss": 2.0,
        "val_ppl": 7.39,
        "val_accuracy": 0.4,
        "val_tokens": 100.0,
        "val_bleu": 12.345,
        "val_rouge1": 0.41,
        "val_rouge2": 0.1,
        "val_rougeL": 0.3,
        "val_recipe_overall": 0.8,
        "val_mine": 3.0,
        "val_gen_samples": 8.0,
        "val_gen_time_s": 1.5,
    }
    assert generation_scores(metrics) == (
        "bleu 12.35 (0-100)  rouge1 0.4100  rouge2 0.1000  rougeL 0.3000  "
        "recipe_overall 0.8000 (0-1)  mine 3.0000"
    )
    assert generation_scores({"val_loss": 2.0, "val_ppl": 7.39, "val_accuracy": 0.4}) == ""
    assert metric_scale("bleu") == "0-100"
    assert metric_scale("val_rougeL") == metric_scale("recipe_format") == "0-1"
    assert metric_scale("val_mine") is None


def _run_view(step: int = 4, total: int = 8):
    from types import SimpleNamespace

    return SimpleNamespace(state=SimpleNamespace(step=step, total_steps=total))


def test_validation_line_shows_generation_scores_and_a_sane_perplexity(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kiln.callbacks.progress import ProgressCallback

    metrics = {
        "val_loss": 35.6,
        "val_ppl": 2957745137753336.5,
        "val_accuracy": 0.01,
        "val_tokens": 100.0,
        "val_bleu": 1.5,
        "val_rougeL": 0.25,
    }
    ProgressCallback("plain").on_validation_end(_run_view(), metrics)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert err == (
        "step 4/8  val_loss 35.6000  ppl 2.958e+15  acc 0.010  bleu 1.50 (0-100)  "
        "rougeL 0.2500 (0-1)\n"
    )


def test_single_point_plots_have_integer_steps_and_a_visible_point() -> None:
    pytest.importorskip("matplotlib")
    from kiln.plots import loss_figure

    records = [
        {"step": 5, "split": "train", "loss": 3.0, "lr": 1e-3},
        {"step": 5, "split": "val", "loss": 3.1, "val_loss": 3.1},
    ]
    [ax] = loss_figure(records, "one").axes
    ax.figure.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks
    assert all(float(t).is_integer() for t in ticks)
    assert all(line.get_marker() not in (None, "None", "") for line in ax.lines)


# ---- short tries and the tokenizer (item 7) --------------------------------------------------


def test_warmup_longer_than_the_run_says_what_to_change(tmp_path: Path, recipe_files) -> None:
    from kiln.config import ConfigError

    with pytest.raises(ConfigError) as info:
        tiny_config(tmp_path, *recipe_files, train={"max_steps": 2}, optim={"warmup_steps": 5})
    assert info.value.problems == [
        "optim.warmup_steps: must be < train.max_steps (2), got 5; "
        "lower optim.warmup_steps or raise train.max_steps"
    ]


def test_a_tokenizer_smaller_than_asked_is_logged(
    tmp_path: Path, recipe_files, caplog: pytest.LogCaptureFixture
) -> None:
    from kiln.models.tokenizer import build_tokenizer

    cfg = tiny_config(tmp_path, *recipe_files, tokenizer={"vocab_size": 2048})
    with caplog.at_level(logging.INFO, logger="kiln"):
        tokenizer = build_tokenizer(cfg, ["chop the garlic", "stir the soup"] * 20)
    assert len(tokenizer) < 2048
    lines = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert lines == [
        f"tokenizer.vocab_size: 2048 asked, {len(tokenizer)} trained: the text has no more pairs "
        "seen tokenizer.min_frequency (2) times (more text or a lower one gives more)"
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="kiln"):
        build_tokenizer(cfg.replace(**{"tokenizer.vocab_size": 260}), ["chop the garlic"] * 20)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---- bf16 on a CPU (item 9) ------------------------------------------------------------------


def test_bf16_on_cpu_warns_once_naming_the_key(caplog: pytest.LogCaptureFixture) -> None:
    import torch

    from kiln.device import Precision

    with caplog.at_level(logging.INFO, logger="kiln"):
        Precision("fp32", torch.device("cpu"))
        assert caplog.records == []
        Precision("bf16", torch.device("cpu"))
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith("train.precision: bf16 on a CPU is usually much slower")
    assert "train.precision=fp32" in record.getMessage()


# ---- checkpoints in shipped configs (item 5) -------------------------------------------------

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_every_shipped_config_checkpoints_periodically() -> None:
    from kiln.config import load_config

    assert len(CONFIGS) >= 7
    for path in CONFIGS:
        cfg = load_config(path)
        every = cfg.checkpoint.every_steps
        assert every is not None, f"{path.name}: no checkpoint.every_steps"
        if cfg.train.max_steps is not None:
            assert every < cfg.train.max_steps, path.name  # a crash must not lose the whole run


# ---- progress without a terminal (item 4) ----------------------------------------------------


def test_auto_progress_off_a_tty_prints_a_line_per_log_step(
    tmp_path: Path, recipe_files, capsys: pytest.CaptureFixture[str]
) -> None:
    from kiln.callbacks.progress import ProgressCallback

    assert ProgressCallback("auto").mode == "plain"  # pytest's stderr is not a TTY
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 40},
        eval={"every_steps": 20, "max_batches": 1},
        log={"every_steps": 5, "progress": "auto"},
    )
    Trainer.from_config(cfg).fit()
    lines = capsys.readouterr().err.splitlines()
    train = [x for x in lines if x.startswith("step ") and " loss " in x]
    assert [x.split()[1] for x in train] == [f"{s}/40" for s in range(5, 41, 5)]
    val = [x for x in lines if x.startswith("step ") and " val_loss " in x]
    assert [x.split()[1] for x in val] == ["20/40", "40/40"]


def test_report_prints_a_huge_perplexity_in_scientific_notation() -> None:
    from kiln.report import _num

    assert _num(2957745137753336.5) == "2.958e+15"
    assert _num(1234567.891, 1) == "1,234,567.9"  # tokens/s stays as it was


def test_warmup_longer_than_an_epoch_run_says_what_to_change(tmp_path: Path, recipe_files) -> None:
    from kiln.errors import KilnError

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": None, "num_epochs": 1},
        optim={"warmup_steps": 500},
    )
    with pytest.raises(KilnError) as info:
        Trainer(cfg).setup()
    assert str(info.value).endswith(
        "got 500; lower optim.warmup_steps or train for more steps (train.max_steps, "
        "train.num_epochs)"
    )
