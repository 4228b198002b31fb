"""Issue 26 item 32: a generation-eval time budget skips whole samples, never cuts one.

The model here is a scripted stand-in whose every decoding step costs one second on an injected
clock (no real sleeps): `max_time` stops all rows of a batch, as transformers' MaxTimeCriteria
does. A sample that completes scores the same whatever the budget; one the budget would cut is
left out; the metrics and the log say how many were scored.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from helpers import bpe_tokenizer, make_rows, tiny_raw

import kiln.models.generation as generation
from kiln.config import load_config
from kiln.engine.generate_eval import GenerationEval, eval_pairs
from kiln.metrics.display import generation_scores
from kiln.metrics.registry import GenSample, get_metric

ROWS = make_rows(4, seed=11)
STEPS = [5, 5, 5, 31]
"""Decoding steps each sample takes to complete: EOS after 4 tokens (rows 0-2), after 30 (3)."""


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class ScriptedLM(torch.nn.Module):
    """A decoder-only stand-in for a transformers model: continues each prompt with its script,
    one token per step; every step costs a second on `clock`; `max_time` ends the batch."""

    def __init__(self, scripts: dict[tuple[int, ...], list[int]], clock: Clock) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(is_encoder_decoder=False, n_positions=512)
        self.scripts, self.clock = scripts, clock

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kw: Any) -> Any:
        start, eos, pad = self.clock.now, kw["eos_token_id"], kw["pad_token_id"]
        rows = [
            self.scripts[tuple(r[m.bool()].tolist())]
            for r, m in zip(input_ids, attention_mask, strict=True)
        ]
        done, steps = [False] * len(rows), []
        for t in range(kw["max_new_tokens"]):
            tokens = [pad if d else s[t] for d, s in zip(done, rows, strict=True)]
            done = [d or tok == eos for d, tok in zip(done, tokens, strict=True)]
            steps.append(tokens)
            self.clock.now += 1.0
            if all(done):
                break
            if kw.get("max_time") is not None and self.clock.now - start >= kw["max_time"]:
                break
        return torch.cat([input_ids, torch.tensor(steps).T], dim=1)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return bpe_tokenizer([r["text"] for r in ROWS])


def _cfg(tmp_path: Path, max_time_s: float | None) -> Any:
    generate = {"num_samples": 4, "batch_size": 2, "max_new_tokens": 40, "metrics": ["bleu"]}
    raw = tiny_raw(tmp_path, tmp_path / "t.jsonl", None, eval={"generate": generate})
    raw["eval"]["generate"]["max_time_s"] = max_time_s
    return load_config(data=raw, complete=False)


def _run(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch, max_time_s: float | None
) -> tuple[dict[str, float], list[dict[str, str]]]:
    """One generation eval of ROWS on the scripted model: (metrics, samples file lines)."""
    cfg = _cfg(tmp_path, max_time_s)
    scripts = {}
    for (prompt, reference), steps in zip(eval_pairs(cfg, ROWS, 4), STEPS, strict=True):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        text = tokenizer(reference, add_special_tokens=False)["input_ids"]
        assert len(text) >= steps - 1
        scripts[tuple(ids)] = text[: steps - 1] + [tokenizer.eos_token_id] + [0] * 60
    clock = Clock()
    monkeypatch.setattr(generation, "time", clock)  # the budget's clock
    samples = tmp_path / f"samples-{max_time_s}.jsonl"
    metrics = GenerationEval(cfg).run(
        ScriptedLM(scripts, clock), tokenizer, ROWS, samples_file=samples
    )
    assert metrics is not None
    lines = [json.loads(x) for x in samples.read_text().splitlines()] if samples.exists() else []
    return metrics, lines


def _scores(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k != "val_gen_time_s"}


def test_item32_complete_samples_score_the_same_on_a_slow_machine(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    fast, fast_lines = _run(tmp_path, tokenizer, monkeypatch, None)
    assert fast["val_gen_samples"] == fast["val_gen_samples_scored"] == 4
    assert len(fast_lines) == 4
    # 36 s of decoding against a 100 s budget: every sample completes, the numbers are equal.
    slow, slow_lines = _run(tmp_path, tokenizer, monkeypatch, 100.0)
    assert _scores(slow) == _scores(fast)
    assert slow_lines == fast_lines


@pytest.mark.parametrize(
    ("budget", "scored"),
    [
        (12.0, 3),  # the second batch runs out at 12 s: row 2 (EOS at 5 s in) is complete, 3 cut
        (5.5, 2),  # 0.5 s left for the second batch: both of its rows cut
        (5.0, 2),  # no time left: the second batch is skipped whole
        (3.0, 0),  # the first batch is cut: nothing complete, nothing scored
    ],
)
def test_item32_a_budget_skips_samples_and_never_cuts_one(
    tmp_path: Path,
    tokenizer: Any,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    budget: float,
    scored: int,
) -> None:
    _, full_lines = _run(tmp_path, tokenizer, monkeypatch, None)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        cut, lines = _run(tmp_path, tokenizer, monkeypatch, budget)
    assert cut["val_gen_samples"] == 4
    assert cut["val_gen_samples_scored"] == scored
    assert lines == full_lines[:scored]  # complete samples only, each as generated in full
    # The score covers the complete samples: the same as an eval of those samples alone.
    if scored:
        samples = [GenSample(x["prompt"], x["reference"], x["generation"]) for x in lines]
        assert cut["val_bleu"] == get_metric("bleu")(samples)["bleu"]
    else:
        assert "val_bleu" not in cut
    said = [r.getMessage() for r in caplog.records]
    assert any(f"{scored} of 4 samples scored" in m and "time budget" in m for m in said), said
    assert f"({scored} of 4 samples, time budget)" in generation_scores(cut)
