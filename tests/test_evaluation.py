"""Validation (exact token-weighted numbers, flat memory), generation eval, `kiln eval`."""

from __future__ import annotations

import json
import weakref
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torch.nn.functional as F
from helpers import make_rows, tiny_config, write_jsonl
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.modeling_outputs import CausalLMOutput

from kiln import Trainer
from kiln.config import ConfigError
from kiln.data import TokenDataset
from kiln.device import Precision
from kiln.engine.evaluate import evaluate
from kiln.engine.generate_eval import GenerationEval, eval_pairs
from kiln.errors import KilnError
from kiln.models import train_bpe_tokenizer

CPU = Precision("fp32", torch.device("cpu"))


def _tiny_gpt2(vocab: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def test_val_loss_is_the_token_weighted_mean_computed_by_hand() -> None:
    model = _tiny_gpt2()
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(1, 64, (n,), generator=g).tolist() for n in (30, 3, 17, 2, 9, 25, 6)]
    # By hand: every sequence alone, no padding; position t predicts token t + 1.
    loss_sum, n_tokens, n_right = 0.0, 0, 0
    per_batch = []
    with torch.no_grad():
        for ids in seqs:
            x = torch.tensor(ids)[None]
            logits = model(x).logits[0, :-1]
            losses = F.cross_entropy(logits.double(), x[0, 1:], reduction="none")
            loss_sum += float(losses.sum())
            n_tokens += len(ids) - 1
            n_right += int((logits.argmax(-1) == x[0, 1:]).sum())
            per_batch.append((float(losses.sum()), len(ids) - 1))
    data = TokenDataset(seqs)
    got = evaluate(model, data, task="causal_lm", batch_size=3, pad_id=0, precision=CPU)
    assert got is not None
    assert got["val_tokens"] == n_tokens
    assert got["val_loss"] == pytest.approx(loss_sum / n_tokens, rel=1e-6)
    assert got["val_ppl"] == pytest.approx(torch.tensor(loss_sum / n_tokens).exp().item(), 1e-6)
    assert got["val_accuracy"] == n_right / n_tokens
    # Not the mean of per-batch means: that would weight the short batch like the long ones.
    batch_means = [
        sum(s for s, _ in per_batch[i : i + 3]) / sum(n for _, n in per_batch[i : i + 3])
        for i in range(0, 7, 3)
    ]
    assert abs(sum(batch_means) / 3 - got["val_loss"]) > 1e-4
    # max_batches bounds it to the first batches: the first two batches = six sequences.
    two = evaluate(
        model, data, task="causal_lm", batch_size=3, pad_id=0, precision=CPU, max_batches=2
    )
    assert two is not None
    assert two["val_tokens"] == sum(n for _, n in per_batch[:6])
    assert two["val_loss"] == pytest.approx(
        sum(s for s, _ in per_batch[:6]) / sum(n for _, n in per_batch[:6]), rel=1e-6
    )
    stopped = evaluate(
        model,
        data,
        task="causal_lm",
        batch_size=3,
        pad_id=0,
        precision=CPU,
        should_stop=lambda: True,
    )
    assert stopped is None


class _WideLM(torch.nn.Module):
    """A causal LM with a wide vocabulary (big logits per batch); remembers its logits weakly."""

    def __init__(self, vocab: int = 8192) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(vocab, 8)
        self.out = torch.nn.Linear(8, vocab)
        self.live: weakref.WeakSet[torch.Tensor] = weakref.WeakSet()
        self.max_live = 0
        self.rss: list[int] = []
        self._proc = psutil.Process()

    def forward(self, input_ids: torch.Tensor, **_: Any) -> CausalLMOutput:
        self.max_live = max(self.max_live, len(self.live))  # logits still alive from before
        self.rss.append(self._proc.memory_info().rss)
        logits = self.out(self.emb(input_ids))  # (B, T, V)
        self.live.add(logits)
        return CausalLMOutput(logits=logits)


def test_validation_memory_is_flat_as_the_val_set_grows() -> None:
    """8 MiB of logits per batch: 6x the batches must not keep more of them, nor more RSS."""
    block = torch.randint(0, 8192, (4 * 48, 64))
    peaks = []
    for n_batches in (8, 48):
        model = _WideLM()
        data = TokenDataset(block[: 4 * n_batches].clone())
        got = evaluate(model, data, task="causal_lm", batch_size=4, pad_id=0, precision=CPU)
        assert got is not None
        assert got["val_tokens"] == n_batches * 4 * 63
        assert model.max_live == 0  # no earlier batch's logits survive into the next forward
        peaks.append(max(model.rss) - model.rss[0])
    # Kept logits would add 8 MiB per batch (320 MiB over 40 more batches); allow noise.
    assert peaks[1] - peaks[0] < 48 * 2**20, peaks


# ---- generation eval ---------------------------------------------------------------------------


def test_eval_pairs_split_rows_per_task(tmp_path: Path, recipe_files) -> None:
    rows = make_rows(3)
    cfg = tiny_config(tmp_path, *recipe_files)
    pairs = eval_pairs(cfg, rows, 2)
    assert len(pairs) == 2
    assert pairs[0][0] == rows[0]["text"].split("\n", 1)[0] + "\n"
    assert pairs[0][0] + pairs[0][1] == rows[0]["text"]
    marked = tiny_config(tmp_path, *recipe_files, eval={"generate": {"prompt_split": "Steps:\n"}})
    prompt, ref = eval_pairs(marked, rows, 1)[0]
    assert prompt.endswith("Steps:\n")
    assert ref.startswith("1. ")
    assert eval_pairs(marked, [{"text": "no marker here"}], 5) == []
    s2s = tiny_config(
        tmp_path,
        *recipe_files,
        task="seq2seq",
        model={"arch": "t5"},
        data={"source_template": "Title: {title}", "target_template": "{steps}"},
    )
    assert eval_pairs(s2s, rows, 1) == [(f"Title: {rows[0]['title']}", "\n".join(rows[0]["steps"]))]
    inst = tiny_config(
        tmp_path,
        *recipe_files,
        task="instruction",
        data={"prompt_template": "Recipe for {title}:\n", "response_template": "{text}"},
    )
    assert eval_pairs(inst, rows, 1) == [(f"Recipe for {rows[0]['title']}:\n", rows[0]["text"])]


@pytest.mark.slow
def test_trainer_logs_generation_metrics_and_writes_samples(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 6, "batch_size": 8},
        eval={
            "every_steps": 2,
            "generate": {
                "num_samples": 3,
                "metrics": ["bleu", "rouge", "recipe"],
                "max_new_tokens": 8,
                "every_steps": 4,
            },
        },
    )
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    gen_keys = {
        "val_bleu",
        "val_rouge1",
        "val_rouge2",
        "val_rougeL",
        "val_recipe_format",
        "val_recipe_overall",
        "val_gen_samples",
    }
    # Generation at multiples of 4 and at the last validation (6), not at 2.
    assert [gen_keys <= m.keys() for m in result.metrics] == [False, True, True]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-4.jsonl", "step-6.jsonl"]
    lines = [json.loads(x) for x in (run / "samples" / "step-6.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    assert set(lines[0]) == {"prompt", "reference", "generation"}
    assert lines[0]["prompt"].startswith("Title: ")
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["split"] == "val"]
    assert val[-1]["val_gen_samples"] == 3.0
    assert 0 <= val[-1]["val_recipe_overall"] <= 1


def test_unknown_metric_fails_before_training(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path, *recipe_files, eval={"generate": {"num_samples": 2, "metrics": ["bleu", "nope"]}}
    )
    with pytest.raises(KilnError, match=r"eval.generate.metrics\[1\]: unknown metric 'nope'"):
        Trainer(cfg)
    gen = GenerationEval(tiny_config(tmp_path, *recipe_files))
    assert not gen.due(4, last=True)  # num_samples 0: off


def test_config_cross_checks(tmp_path: Path, recipe_files) -> None:
    with pytest.raises(ConfigError, match="comes from generation eval"):
        tiny_config(
            tmp_path,
            *recipe_files,
            eval={"early_stopping": {"enabled": True, "metric": "val_bleu", "mode": "max"}},
        )
    with pytest.raises(ConfigError, match=r"checkpoint\.final: best needs checkpoint\.keep_best"):
        tiny_config(tmp_path, *recipe_files, checkpoint={"final": "best"})
    with pytest.raises(ConfigError, match="needs validation data"):
        tiny_config(
            tmp_path,
            recipe_files[0],
            None,
            data={"val_split": 0.0},
            eval={"early_stopping": {"enabled": True}},
        )


# ---- kiln eval ---------------------------------------------------------------------------------


@pytest.mark.parametrize("isolate", [True, False])
def test_load_eval_data_is_the_runs_validation_data(
    tmp_path: Path, recipe_files, isolate: bool
) -> None:
    from kiln.data import load_eval_data, load_splits, prepare_data

    train, val = recipe_files
    rows = make_rows(20, seed=2)
    write_jsonl(val, rows + rows[:3])  # repeats: dropped by data.dedup, as in training
    data = {"min_quality_score": 0.2, "isolate_documents": isolate}
    cfg = tiny_config(tmp_path, train, val, data=data)
    tok = train_bpe_tokenizer([r["text"] for r in make_rows(60)], vocab_size=300)
    _, val_rows, _ = load_splits(cfg)
    _, val_ds, _ = prepare_data(cfg, tok)
    assert val_ds is not None
    want = val_ds if isolate else val_ds.without_documents()  # what the trainer evaluates

    got_rows, got, stats = load_eval_data(cfg, tok, str(val))
    assert got_rows == val_rows
    assert (len(got), got.num_tokens) == (len(want), want.num_tokens)
    assert all(torch.equal(got[i]["input_ids"], want[i]["input_ids"]) for i in range(len(got)))
    assert (got.doc_starts is None) == (not isolate)
    assert stats.rows_read == 23
    low = [r["quality_score"] < 0.2 for r in rows + rows[:3]]  # filtered before dedup
    assert stats.dropped["low_quality"] == sum(low)
    assert stats.dropped["duplicate"] == 3 - sum(low[-3:])
    assert len(got_rows) == 23 - stats.dropped["low_quality"] - stats.dropped["duplicate"]
    assert (stats.val_rows, stats.val_examples) == (len(got_rows), len(got))
    assert stats.val_tokens == got.num_tokens


@pytest.mark.slow
def test_kiln_eval_reproduces_the_runs_validation(tmp_path: Path, recipe_files, capsys) -> None:
    from kiln.cli import main

    cfg = tiny_config(
        tmp_path,
        *recipe_files,
        train={"max_steps": 8, "batch_size": 8},
        checkpoint={"every_steps": 4},
    )
    result = Trainer(cfg).fit()
    run = tmp_path / "run"
    val = str(recipe_files[1])
    overrides = ["eval.generate.max_new_tokens=6", "eval.generate.metrics=[bleu,recipe]"]
    assert main(["eval", str(run), "--data", val, "--num-samples", "2", *overrides]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out
    assert "val_recipe_overall" in out
    report = json.loads((run / "eval" / "val.json").read_text())
    assert report["metrics"]["val_loss"] == pytest.approx(result.metrics[-1]["val_loss"], rel=1e-6)
    assert report["metrics"]["val_gen_samples"] == 2
    assert (run / "eval" / "val.samples.jsonl").is_file()
    # A checkpoint evaluates too, with its own weights (step 4, not the final step 8).
    ckpt = run / "checkpoints" / "step-4"
    target = tmp_path / "ckpt.json"
    assert main(["eval", str(ckpt), "--data", val, "--out", str(target), "--max-batches", "1"]) == 0
    step4 = json.loads(target.read_text())["metrics"]
    assert step4["val_loss"] != pytest.approx(report["metrics"]["val_loss"])
    # Bad input: one line, exit 2.
    assert main(["eval", str(run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["eval", str(run), "--data", val, "--max-batches", "0"]) == 2
    err = capsys.readouterr().err
    assert "kiln: error: --max-batches: must be >= 1" in err
