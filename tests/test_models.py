"""Tokenizers and models: tiny, offline, in-process (saved to tmp dirs to test loading)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import (
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    T5ForConditionalGeneration,
)

from kiln.config import RunConfig, load_config
from kiln.errors import ModelError
from kiln.models import (
    build_model,
    build_tokenizer,
    count_parameters,
    ensure_pad_token,
    load_tokenizer,
    model_flops_per_token,
    train_bpe_tokenizer,
)

WORDS = [
    *("flour", "sugar", "butter", "eggs", "milk", "salt", "pepper", "whisk", "bake", "fold"),
    *("simmer", "stir", "chop", "oven", "minutes", "cups", "tbsp", "until", "golden"),
    *("crème", "brûlée", "jalapeño", "🍰", "🔥", "and", "the", "a", "of", "with"),
]
TRICKY = [
    "crème brûlée, 2 tbsp.",
    "Bake 🍰 at 180°C — until golden 🔥!",
    "  leading spaces\tand tabs\nnew lines  ",
    "Ünïcödé 日本語 😀👩‍🍳",
    "a , b . c",
]


def _texts(n: int = 400) -> list[str]:
    rng = random.Random(0)
    return [
        f"Step {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."
        for i in range(n)
    ]


def _cfg(
    task: str = "causal_lm", tokenizer: dict[str, Any] | None = None, **model: Any
) -> RunConfig:
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 64}
    if "name_or_path" in model:
        sizes = {}
    return load_config(
        data={
            "task": task,
            "model": {**sizes, **model},
            "tokenizer": tokenizer or {},
            "data": {"train": "unused.jsonl", "max_length": 32},
            "train": {"max_steps": 1},
        }
    )


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerBase:
    return train_bpe_tokenizer(_texts(), vocab_size=400)


def _ids(tok: PreTrainedTokenizerBase, text: str = "whisk the eggs with sugar") -> torch.Tensor:
    return torch.tensor([tok(text)["input_ids"]])


# --- tokenizer -------------------------------------------------------------------------------


def test_bpe_special_tokens_and_size(tok: PreTrainedTokenizerBase) -> None:
    assert tok.eos_token == tok.bos_token == tok.unk_token == "<|endoftext|>"
    assert tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id
    assert 256 < len(tok) <= 400
    assert tok.model_max_length == 1024


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trips_exactly(tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok(text)["input_ids"]
    assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert tok.decode(ids) == text


def test_bpe_save_and_reload(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in TRICKY + _texts(20):
        assert again(text)["input_ids"] == tok(text)["input_ids"]
        assert again.decode(tok(text)["input_ids"]) == text
    assert (again.pad_token_id, again.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert again.model_max_length == tok.model_max_length


def test_bpe_is_deterministic(tok: PreTrainedTokenizerBase) -> None:
    again = train_bpe_tokenizer(_texts(), vocab_size=400)
    assert again.get_vocab() == tok.get_vocab()
    assert again.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


def test_build_tokenizer_trains_with_config_sizes() -> None:
    cfg = _cfg(arch="gpt2", tokenizer={"vocab_size": 300})
    built = build_tokenizer(cfg, _texts())
    assert len(built) == 300
    assert built.model_max_length == 64
    with pytest.raises(ValueError, match="texts"):
        build_tokenizer(cfg, None)


def test_ensure_pad_token_uses_eos_then_adds(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    tok.save_pretrained(tmp_path)
    no_pad = AutoTokenizer.from_pretrained(tmp_path)
    no_pad.pad_token = None
    message = ensure_pad_token(no_pad)
    assert message is not None
    assert "\n" not in message
    assert "eos" in message
    assert no_pad.pad_token_id == no_pad.eos_token_id
    assert ensure_pad_token(no_pad) is None

    bare = AutoTokenizer.from_pretrained(tmp_path)
    bare.pad_token = None
    bare.eos_token = None
    n = len(bare)
    message = ensure_pad_token(bare)
    assert message is not None
    assert "<|pad|>" in message
    assert bare.pad_token == "<|pad|>"
    assert bare.pad_token_id is not None
    assert len(bare) in (n, n + 1)


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_load_tokenizer_errors_are_one_line(tmp_path: Path, where: str) -> None:
    path = tmp_path / where
    if where == "empty":
        path.mkdir()
    with pytest.raises(ModelError) as err:
        load_tokenizer(str(path))
    text = str(err.value)
    assert text.startswith("tokenizer.name_or_path: ")
    assert str(path) in text
    assert "\n" not in text
    assert err.value.__cause__ is None  # no chained hub traceback
    assert err.value.__context__ is None or err.value.__suppress_context__


# --- models from scratch ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "task", "cls"),
    [
        ("gpt2", "causal_lm", GPT2LMHeadModel),
        ("llama", "causal_lm", LlamaForCausalLM),
        ("t5", "seq2seq", T5ForConditionalGeneration),
    ],
)
def test_build_from_scratch(tok: PreTrainedTokenizerBase, arch: str, task: str, cls: type) -> None:
    model = build_model(_cfg(task, arch=arch), tok)
    assert type(model) is cls
    c = model.config
    assert c.vocab_size >= len(tok)
    assert c.vocab_size % 64 == 0
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (32, 2, 4)
    assert c._attn_implementation == "sdpa"
    assert model.dtype == torch.float32
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = _ids(tok)
    model.eval()
    if task == "seq2seq":
        assert (c.num_decoder_layers, c.d_kv, c.d_ff) == (2, 8, 128)
        assert c.is_gated_act  # FLAN-T5's gated-GELU
        assert c.decoder_start_token_id == tok.pad_token_id
        out = model(input_ids=ids, labels=ids)
    else:
        out = model(input_ids=ids, labels=ids)
        assert out.logits.shape == (1, ids.shape[1], c.vocab_size)  # (B, T, V)
    assert torch.isfinite(out.loss)
    gen = model.generation_config
    assert (gen.pad_token_id, gen.eos_token_id) == (tok.pad_token_id, tok.eos_token_id)
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[0] == 1


def test_scratch_sizes_and_seeded_init(tok: PreTrainedTokenizerBase) -> None:
    llama = build_model(_cfg(arch="llama"), tok)
    assert llama.config.intermediate_size == 128  # 8/3 x 32 = 85.3, rounded up to 64s
    assert llama.config.num_key_value_heads == 4
    again = build_model(_cfg(arch="llama"), tok)
    assert all(
        torch.equal(a, b) for a, b in zip(llama.parameters(), again.parameters(), strict=True)
    )
    gpt2 = build_model(_cfg(arch="gpt2", intermediate_size=48, tie_word_embeddings=False), tok)
    assert gpt2.transformer.h[0].mlp.c_fc.nf == 48
    assert gpt2.lm_head.weight is not gpt2.transformer.wte.weight
    assert build_model(_cfg(arch="gpt2", dtype="bfloat16"), tok).dtype == torch.bfloat16


def test_count_parameters_and_flops(tok: PreTrainedTokenizerBase) -> None:
    model = build_model(_cfg(arch="gpt2"), tok)
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in set(model.parameters()))
    model.transformer.wte.weight.requires_grad_(False)
    assert count_parameters(model)[1] == total - model.transformer.wte.weight.numel()

    # N: all but the position table (the tied token embedding is the lm_head matmul).
    n = total - model.transformer.wpe.weight.numel()
    expected = 6 * n + 12 * 2 * 4 * 8 * 32
    assert model_flops_per_token(model, 32) == expected
    assert model_flops_per_token(model.config, 32) == expected  # counted on the meta device


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("t5", "seq2seq")])
def test_gradient_checkpointing(tok: PreTrainedTokenizerBase, arch: str, task: str) -> None:
    model = build_model(_cfg(task, arch=arch, gradient_checkpointing=True), tok)
    assert model.is_activation_checkpointing
    configs = [m.config for m in model.modules() if hasattr(m, "config")]
    assert len(configs) >= 1
    assert all(c.use_cache is False for c in configs)  # t5's stacks have their own copies
    model.train()
    ids = _ids(tok)
    model(input_ids=ids, labels=ids).loss.backward()
    assert model.get_output_embeddings().weight.grad is not None
    assert not build_model(_cfg(task, arch=arch), tok).is_activation_checkpointing


def test_flash_attention_falls_back_on_cpu(
    tok: PreTrainedTokenizerBase, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("fallback is for machines without CUDA")
    with caplog.at_level(logging.WARNING, logger="kiln"):
        model = build_model(_cfg(arch="gpt2", attn_implementation="flash_attention_2"), tok)
    assert model.config._attn_implementation == "sdpa"
    assert any("flash_attention_2" in r.getMessage() for r in caplog.records)


# --- pretrained (saved into tmp dirs) --------------------------------------------------------


@pytest.mark.parametrize(("arch", "task"), [("llama", "causal_lm"), ("t5", "seq2seq")])
def test_pretrained_round_trip(
    tok: PreTrainedTokenizerBase, tmp_path: Path, arch: str, task: str
) -> None:
    model = build_model(_cfg(task, arch=arch), tok).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    cfg = _cfg(task, name_or_path=str(tmp_path))
    tok2 = build_tokenizer(cfg, None)
    loaded = build_model(cfg, tok2).eval()
    assert type(loaded) is type(model)
    ids = _ids(tok2)
    assert torch.equal(ids, _ids(tok))
    kwargs = {"decoder_input_ids": ids} if task == "seq2seq" else {}
    with torch.no_grad():
        assert torch.equal(
            model(input_ids=ids, **kwargs).logits, loaded(input_ids=ids, **kwargs).logits
        )


def test_pretrained_resized_for_added_pad(
    tok: PreTrainedTokenizerBase, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = build_model(_cfg(arch="gpt2"), tok)
    model.resize_token_embeddings(len(tok))  # exactly the tokenizer: no room for a new token
    model.save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "tok")
    grown = AutoTokenizer.from_pretrained(tmp_path / "tok")
    grown.add_special_tokens({"pad_token": "<|new_pad|>"})
    assert len(grown) == model.config.vocab_size + 1
    with caplog.at_level(logging.INFO, logger="kiln"):
        loaded = build_model(_cfg(name_or_path=str(tmp_path / "model")), grown)
    rows = loaded.get_input_embeddings().weight.shape[0]
    assert rows >= len(grown)
    assert rows % 64 == 0
    assert any("resized" in r.getMessage() for r in caplog.records)
    assert loaded.generation_config.pad_token_id == grown.pad_token_id
    ids = torch.tensor([[grown.pad_token_id, 5, 6]])
    assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_missing_model_path_is_one_line(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    with pytest.raises(ModelError) as err:
        build_model(_cfg(name_or_path=str(tmp_path / "nope")), tok)
    text = str(err.value)
    assert text.startswith("model.name_or_path: cannot load")
    assert "nope" in text
    assert "\n" not in text
    with pytest.raises(ModelError, match=r"^model\.name_or_path: .*nope"):
        build_tokenizer(_cfg(name_or_path=str(tmp_path / "nope")), None)


def test_wrong_task_for_architecture(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    build_model(_cfg("seq2seq", arch="t5"), tok).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        build_model(_cfg("causal_lm", name_or_path=str(tmp_path)), tok)
    assert str(err.value) == "model.name_or_path: t5 is not a causal LM; set task: seq2seq"


def test_wrong_task_for_causal_dir(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    build_model(_cfg(arch="gpt2"), tok).save_pretrained(tmp_path)
    with pytest.raises(ModelError) as err:
        build_model(_cfg("seq2seq", name_or_path=str(tmp_path)), tok)
    assert str(err.value) == (
        "model.name_or_path: gpt2 is not a seq2seq (encoder-decoder) model; set task: causal_lm"
    )


def test_missing_weights_is_one_line(tok: PreTrainedTokenizerBase, tmp_path: Path) -> None:
    build_model(_cfg(arch="gpt2"), tok).save_pretrained(tmp_path)
    for weights in tmp_path.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ModelError) as err:
        build_model(_cfg(name_or_path=str(tmp_path)), tok)
    assert str(err.value).startswith(f"model.name_or_path: cannot load '{tmp_path}': ")
    assert "\n" not in str(err.value)


def _trainable_grads(model: torch.nn.Module, task: str, ids: torch.Tensor) -> dict[str, Any]:
    model.train()
    model.zero_grad(set_to_none=True)
    kwargs = {"decoder_input_ids": ids} if task == "seq2seq" else {}
    logits = model(input_ids=ids, **kwargs).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize(
    ("arch", "task"), [("gpt2", "causal_lm"), ("llama", "causal_lm"), ("t5", "seq2seq")]
)
def test_gradient_checkpointing_gives_the_same_gradients(
    tok: PreTrainedTokenizerBase, arch: str, task: str, lora: bool
) -> None:
    lora_cfg = {"enabled": lora, "r": 4, "dropout": 0.0}

    def build(checkpointing: bool) -> torch.nn.Module:
        cfg = _cfg(task, arch=arch, gradient_checkpointing=checkpointing)
        cfg = cfg.model_copy(update={"lora": cfg.lora.model_copy(update=lora_cfg)})
        return build_model(cfg, tok)

    plain, ckpt = build(False), build(True)
    assert ckpt.is_activation_checkpointing
    assert not plain.is_activation_checkpointing
    if lora:  # B starts at zero, which would make every A gradient zero: perturb it
        with torch.no_grad():
            for name, p in plain.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1)
    ckpt.load_state_dict(plain.state_dict())
    ids = _ids(tok)
    want, got = _trainable_grads(plain, task, ids), _trainable_grads(ckpt, task, ids)
    assert want.keys() == got.keys()
    assert all("lora_" in n for n in want) == lora
    for name, grad in want.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5, msg=name)


def test_compile_in_place_keeps_names_and_buckets_shapes(tok: PreTrainedTokenizerBase) -> None:
    from kiln.data.collate import Batcher
    from kiln.models.wrap import prepare_for_training

    cfg = _cfg(arch="gpt2")
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"compile": True, "compile_pad_multiple": 16})}
    )
    model = build_model(cfg, tok)
    names = [n for n, _ in model.named_parameters()]
    batcher = Batcher("causal_lm", tok.pad_token_id)
    same = prepare_for_training(model, cfg, torch.device("cpu"), batcher)
    assert same is model  # compiled in place: same class, same parameter names
    assert [n for n, _ in model.named_parameters()] == names
    assert model._compiled_call_impl is not None
    assert batcher.pad_to_multiple_of == 16
    kept = Batcher("causal_lm", tok.pad_token_id, pad_to_multiple_of=8)
    prepare_for_training(build_model(cfg, tok), cfg, torch.device("cpu"), kept)
    assert kept.pad_to_multiple_of == 8  # data.pad_to_multiple_of wins
