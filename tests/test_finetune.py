"""Fine-tuning pretrained models from local `save_pretrained` directories, with and without LoRA.

The models are built with transformers alone (no kiln), saved with a tokenizer, and named by
path in the config, the way a user points kiln at a downloaded checkpoint.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import bpe_tokenizer, make_rows, tiny_config, write_jsonl
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
)

from kiln import Trainer

pytestmark = pytest.mark.slow  # six short training runs


def _save_pretrained(arch: str, path: Path, corpus: list[str]) -> None:
    tok = bpe_tokenizer(corpus)
    vocab = len(tok)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2))
    elif arch == "llama":
        config = LlamaConfig(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = LlamaForCausalLM(config)
        tok.pad_token = None  # like Llama's tokenizer: kiln must set one and say so
    else:
        config = T5Config(
            vocab_size=vocab,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
            decoder_start_token_id=tok.pad_token_id,
        )
        model = T5ForConditionalGeneration(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "t5"])
def test_finetune_from_a_local_directory(
    tmp_path: Path, arch: str, lora: bool, caplog: pytest.LogCaptureFixture
) -> None:
    peft = pytest.importorskip("peft")

    rows = make_rows(120, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    src = tmp_path / "pretrained"
    _save_pretrained(arch, src, [r["text"] for r in rows])
    seq2seq = arch == "t5"
    sections = {
        "model": {"arch": None, "name_or_path": str(src)},
        "tokenizer": {},
        "lora": {"enabled": lora, "r": 8, "dropout": 0.0},
        "train": {"max_steps": 10},
        "optim": {"lr": 2e-2 if lora else 5e-3, "warmup_steps": 0, "scheduler": "constant"},
    }
    if seq2seq:
        sections["task"] = "seq2seq"
        sections["data"] = {"source_template": "{title}", "target_template": "{text}"}
    cfg = tiny_config(tmp_path, train, None, **sections)
    with caplog.at_level(logging.INFO, logger="kiln"):
        trainer = Trainer(cfg)
        result = trainer.fit()
    if arch == "llama":
        assert any("no pad token" in r.getMessage() for r in caplog.records)
        assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id
    losses = result.loss_history
    assert len(losses) == 10
    assert sum(losses[-3:]) / 3 < losses[0]  # it learns

    auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    final = tmp_path / "run" / "final"
    if lora:
        loaded = peft.PeftModel.from_pretrained(auto.from_pretrained(src), final)
        assert all(
            not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n
        )
    else:
        loaded = auto.from_pretrained(final)
    ids = torch.tensor([trainer.tokenizer("Title: Lemon Rice")["input_ids"]])
    kwargs = {"decoder_input_ids": ids[:, :4]} if seq2seq else {}
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(input_ids=ids, **kwargs).logits, trainer.model(input_ids=ids, **kwargs).logits
        )
