"""`kiln.models.generation.generate_texts`: the one generation path (rules in its docstring).

Tiny GPT-2 / T5 / BART models built in-process, fp32, checked against greedy decoding by hand.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
import torch
from helpers import bpe_tokenizer, make_rows
from tokenizers import processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    T5Config,
    T5ForConditionalGeneration,
)

from kiln.errors import KilnError
from kiln.models import GenerationOptions, generate_texts
from kiln.models.generation import max_positions

PROMPTS = ["Title: Lemon Rice\n", "Title: A much longer title for a chickpea soup\n", "Steps"]


@pytest.fixture(scope="module")
def tok() -> Any:
    return bpe_tokenizer([r["text"] for r in make_rows(40)], vocab_size=300)


def _gpt2(tok: Any, positions: int = 64) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_embd=16,
        n_layer=2,
        n_head=2,
        n_positions=positions,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return GPT2LMHeadModel(cfg).eval()


def _t5(tok: Any) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=len(tok),
        d_model=16,
        d_ff=32,
        d_kv=8,
        num_layers=2,
        num_heads=2,
        decoder_start_token_id=tok.pad_token_id,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return T5ForConditionalGeneration(cfg).eval()


def _ids(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def _greedy(model: Any, ids: list[int], n: int, eos: int) -> list[int]:
    """Decoder-only greedy decoding by hand: argmax of the last position, stop at EOS."""
    seq, out = torch.tensor([ids]), []
    for _ in range(n):
        nxt = int(model(input_ids=seq).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return out


@torch.no_grad()
def _greedy_seq2seq(model: Any, source: list[int], n: int, start: int, eos: int) -> list[int]:
    enc = torch.tensor([source])
    dec, out = torch.tensor([[start]]), []
    for _ in range(n):
        nxt = int(model(input_ids=enc, decoder_input_ids=dec).logits[0, -1].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        dec = torch.cat([dec, torch.tensor([[nxt]])], dim=1)
    return out


class _Spy:
    """Stands in for `model.generate`: records each call's input ids and generated tokens."""

    def __init__(self, model: Any) -> None:
        self.generate, self.inputs, self.outputs = model.generate, [], []
        model.generate = self

    def __call__(self, **kwargs: Any) -> torch.Tensor:
        out = self.generate(**kwargs)
        self.inputs.append(kwargs["input_ids"].tolist())
        self.outputs.append(out.tolist())
        return out

    def new_tokens(self, eos: int, *, seq2seq: bool = False) -> list[list[int]]:
        """Every row's generated tokens up to its EOS (batch padding and decoder start cut)."""
        rows = []
        for inputs, outputs in zip(self.inputs, self.outputs, strict=True):
            for row in outputs:
                row = row[1:] if seq2seq else row[len(inputs[0]) :]
                rows.append(row[: row.index(eos)] if eos in row else row)
        return rows


def test_batched_left_padding_gives_the_tokens_of_one_at_a_time(tok: Any) -> None:
    model = _gpt2(tok)
    eos = tok.eos_token_id
    lengths = {len(_ids(tok, p)) for p in PROMPTS}
    assert len(lengths) == 3  # three widths: two rows of the batch are padded
    spy = _Spy(model)
    texts = generate_texts(model, tok, PROMPTS, options=GenerationOptions(max_new_tokens=10))
    # One batch, left-padded: every row ends with its prompt.
    assert len(spy.inputs) == 1
    for row, prompt in zip(spy.inputs[0], PROMPTS, strict=True):
        ids = _ids(tok, prompt)
        assert row[-len(ids) :] == ids
        assert set(row[: -len(ids)]) <= {tok.pad_token_id}
    expected = [_greedy(model, _ids(tok, p), 10, eos) for p in PROMPTS]
    assert spy.new_tokens(eos) == expected
    assert len({tuple(e) for e in expected}) == 3  # the prompts lead somewhere different
    assert texts == [tok.decode(e, skip_special_tokens=True) for e in expected]
    # One at a time, batch size 1: the same tokens.
    same = _gpt2(tok)
    alone = _Spy(same)
    options = GenerationOptions(max_new_tokens=10)
    assert [generate_texts(same, tok, [p], options=options)[0] for p in PROMPTS] == texts
    assert alone.new_tokens(eos) == expected
    # batch_size splits the prompts into batches, in order.
    assert generate_texts(model, tok, PROMPTS, options=options, batch_size=2) == texts


def test_prompt_longer_than_the_context_is_cut_from_the_left(
    tok: Any, caplog: pytest.LogCaptureFixture
) -> None:
    model = _gpt2(tok, positions=32)
    eos = tok.eos_token_id
    long = " ".join(r["title"] for r in make_rows(20))
    ids = _ids(tok, long)
    assert len(ids) > 40
    spy = _Spy(model)
    with caplog.at_level(logging.WARNING, logger="kiln"):
        [text] = generate_texts(model, tok, [long], options=GenerationOptions(max_new_tokens=8))
    assert spy.inputs[0] == [ids[-24:]]  # 24 prompt + 8 new = 32 positions
    assert spy.new_tokens(eos) == [_greedy(model, ids[-24:], 8, eos)]
    assert text == tok.decode(_greedy(model, ids[-24:], 8, eos))
    assert (
        "1 of 1 prompts cut at the start to 24 tokens (the model has 32 positions)" in caplog.text
    )
    # More new tokens than positions: capped at 31, the prompt keeps its last token.
    generate_texts(model, tok, [long], options=GenerationOptions(max_new_tokens=100))
    assert spy.inputs[1] == [ids[-1:]]
    assert spy.new_tokens(eos)[1] == _greedy(model, ids[-1:], 31, eos)
    assert "generating 31 tokens, not 100: the model has 32 positions" in caplog.text
    assert max_positions(model.config) == 32
    # An empty prompt starts from EOS, the document boundary of packed training data.
    assert generate_texts(model, tok, [""], options=GenerationOptions(max_new_tokens=6)) == [
        tok.decode(_greedy(model, [eos], 6, eos))
    ]


def test_no_special_tokens_are_added_to_the_prompt(tok: Any) -> None:
    bos_tok = bpe_tokenizer([r["text"] for r in make_rows(40)], vocab_size=300)
    eos = bos_tok.eos_token_id
    bos_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", eos)]
    )
    assert bos_tok("Title")["input_ids"][0] == eos  # this tokenizer prepends a BOS by default
    model = _gpt2(bos_tok)
    spy = _Spy(model)
    [text] = generate_texts(model, bos_tok, ["Title"], options=GenerationOptions(max_new_tokens=6))
    assert spy.inputs == [[_ids(bos_tok, "Title")]]
    assert spy.inputs[0][0][0] != eos
    assert text == bos_tok.decode(_greedy(model, _ids(bos_tok, "Title"), 6, eos))


def test_sampling_is_seeded_and_leaves_the_global_rng_alone(tok: Any) -> None:
    model = _gpt2(tok)

    def gen(**kw: Any) -> list[str]:
        return generate_texts(
            model, tok, PROMPTS, options=GenerationOptions(max_new_tokens=12, **kw)
        )

    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = gen(do_sample=True, temperature=1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert a == gen(do_sample=True, temperature=1.5, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert {tuple(gen(do_sample=True, temperature=1.5, seed=s)) for s in range(2, 5)} - {tuple(a)}
    assert a != gen()  # sampling at temperature 1.5 leaves the greedy path
    # top_p this small keeps only the likeliest token, top_k=1 too: both collapse to greedy.
    assert gen(do_sample=True, top_p=1e-6, seed=3) == gen() == gen(do_sample=True, top_k=1)
    # Beams are deterministic.
    assert gen(num_beams=3) == gen(num_beams=3)


def test_model_mode_and_tokenizer_are_restored(tok: Any) -> None:
    model = _gpt2(tok)  # GPT-2 dropout 0.1: generation in train mode would be random
    eos = tok.eos_token_id
    expected = [tok.decode(_greedy(model, _ids(tok, p), 8, eos)) for p in PROMPTS]
    model.train()
    tok.padding_side = "right"
    options = GenerationOptions(max_new_tokens=8)
    assert generate_texts(model, tok, PROMPTS, options=options) == expected
    assert model.training
    assert tok.padding_side == "right"
    model.eval()
    tok.padding_side = "left"
    assert generate_texts(model, tok, PROMPTS, options=options) == expected
    assert not model.training
    assert tok.padding_side == "left"

    # A tokenizer without a pad token pads with EOS, and is left without one.
    no_pad = bpe_tokenizer([r["text"] for r in make_rows(40)], vocab_size=300)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    spy = _Spy(model)
    assert generate_texts(model, no_pad, PROMPTS, options=options) == expected
    assert spy.inputs[0][2][0] == eos  # the short row's padding
    assert no_pad.pad_token is None

    # The mode comes back when generation fails too.
    model.train()
    spy.generate = _raise
    with pytest.raises(RuntimeError, match="boom"):
        generate_texts(model, no_pad, PROMPTS, options=options)
    assert model.training
    assert no_pad.pad_token is None


def _raise(**kwargs: Any) -> torch.Tensor:
    raise RuntimeError("boom")


def test_seq2seq_sources_end_with_eos_and_pad_on_the_right(tok: Any) -> None:
    model = _t5(tok)
    eos, start = tok.eos_token_id, tok.pad_token_id
    assert max_positions(model.config) is None  # relative positions: no source cut
    spy = _Spy(model)
    options = GenerationOptions(max_new_tokens=8)
    texts = generate_texts(model, tok, PROMPTS, options=options)
    sources = [[*_ids(tok, p), eos] for p in PROMPTS]
    for row, source in zip(spy.inputs[0], sources, strict=True):
        assert row[: len(source)] == source
        assert set(row[len(source) :]) <= {tok.pad_token_id}
    expected = [_greedy_seq2seq(model, s, 8, start, eos) for s in sources]
    assert spy.new_tokens(eos, seq2seq=True) == expected
    assert texts == [tok.decode(e, skip_special_tokens=True) for e in expected]
    assert [generate_texts(model, tok, [p], options=options)[0] for p in PROMPTS] == texts
    # Sampling works for seq2seq too, seeded.
    sampled = GenerationOptions(max_new_tokens=8, do_sample=True, temperature=2.0, seed=1)
    first = generate_texts(model, tok, PROMPTS, options=sampled)
    assert first == generate_texts(model, tok, PROMPTS, options=sampled)
    assert first != texts


def test_seq2seq_source_is_cut_to_the_encoder_limit(tok: Any) -> None:
    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=len(tok),
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=16,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        decoder_start_token_id=tok.eos_token_id,
    )
    model = BartForConditionalGeneration(cfg).eval()
    long = " ".join(r["title"] for r in make_rows(10))
    spy = _Spy(model)
    [text] = generate_texts(model, tok, [long], options=GenerationOptions(max_new_tokens=40))
    source = [*_ids(tok, long)[:15], tok.eos_token_id]  # the start, then EOS: 16 positions
    assert spy.inputs == [[source]]
    assert len(spy.outputs[0][0]) <= 16  # decoder start + at most 15 new tokens
    assert isinstance(text, str)


def test_time_budget_and_should_stop_return_a_prefix(tok: Any) -> None:
    model = _gpt2(tok)
    options = GenerationOptions(max_new_tokens=4)
    full = generate_texts(model, tok, PROMPTS, options=options, batch_size=1)
    assert generate_texts(model, tok, PROMPTS, options=options, max_time_s=1e-9) == []
    assert generate_texts(model, tok, PROMPTS, options=options, should_stop=lambda: True) == []
    calls = iter([False, True])
    stop_after_one = generate_texts(
        model, tok, PROMPTS, options=options, batch_size=1, should_stop=lambda: next(calls)
    )
    assert stop_after_one == full[:1]
    assert generate_texts(model, tok, [], options=options) == []


def test_bad_options_are_one_line_errors(tok: Any) -> None:
    with pytest.raises(KilnError, match=r"^temperature: must be > 0, got 0.0$"):
        GenerationOptions(temperature=0.0).check()
    with pytest.raises(KilnError, match=r"^--top-p: must be in \(0, 1\], got 0.0$"):
        GenerationOptions(top_p=0.0).check(flags=True)
    with pytest.raises(
        KilnError, match=r"^--num-beams: beam search is deterministic; drop --sample$"
    ):
        GenerationOptions(num_beams=2, do_sample=True).check(flags=True)
    with pytest.raises(KilnError, match=r"^max_new_tokens: must be >= 1, got 0$"):
        generate_texts(_gpt2(tok), tok, ["x"], options=GenerationOptions(max_new_tokens=0))
