"""Batching: the collator registry, pad_to_multiple_of, length grouping, packed documents.

Document isolation in packed blocks relies on transformers (5.x) turning `position_ids` that
restart at 0, with no attention_mask, into a block-diagonal causal mask
(`masking_utils.find_packed_sequence_indices`, used by `create_causal_mask` for sdpa and eager
attention). GPT-2 and Llama both pass their position_ids to `create_causal_mask`, so both
isolate: the tests below check that a packed batch gives the same loss as each document alone.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import tiny_config

from kiln import Callback, StopRequest, Trainer
from kiln.data import BatchCursor, TokenDataset, epoch_permutation, tokenize_causal
from kiln.data.collate import (
    COLLATORS,
    IGNORE_INDEX,
    Batcher,
    collate,
    get_collator,
    packed_batch,
    register_collator,
)
from kiln.data.sampler import MEGA_BATCHES, grouped_permutation
from kiln.engine.loss import count_targets, forward_loss_sum
from kiln.errors import KilnError

# --- registry ------------------------------------------------------------------------------


def test_registry_defaults_and_unknown_name() -> None:
    assert {"causal", "instruction", "seq2seq"} <= set(COLLATORS)
    assert get_collator("auto", "causal_lm") is COLLATORS["causal"]
    assert get_collator("auto", "instruction") is COLLATORS["instruction"]
    assert get_collator("auto", "seq2seq") is COLLATORS["seq2seq"]
    assert get_collator("causal", "instruction") is COLLATORS["causal"]
    with pytest.raises(KeyError, match=r"unknown collator 'nope' \(known: auto, causal, "):
        get_collator("nope", "causal_lm")
    assert get_collator("kiln.data.collate:collate_seq2seq", "causal_lm") is COLLATORS["seq2seq"]
    with pytest.raises(ValueError, match="unknown task"):
        get_collator("auto", "mlm")
    with pytest.raises(ValueError, match="already registered"):
        register_collator("causal")(COLLATORS["causal"])


def test_register_custom_collator_is_used_by_the_batcher() -> None:
    @register_collator("test_reversed")
    def reversed_collator(examples, *, pad_id, pad_to_multiple_of=None):  # type: ignore[no-untyped-def]
        flipped = [{"input_ids": torch.as_tensor(e["input_ids"]).flip(0)} for e in examples]
        return COLLATORS["causal"](flipped, pad_id=pad_id, pad_to_multiple_of=pad_to_multiple_of)

    try:
        ds = TokenDataset(torch.arange(8).view(2, 4))
        batch = Batcher("causal_lm", 0, collator="test_reversed")(ds, torch.tensor([0]))
        # A named collator replaces the packed fast path.
        assert batch["input_ids"].tolist() == [[3, 2, 1, 0]]
    finally:
        COLLATORS.pop("test_reversed")


def test_unknown_collator_is_a_one_line_config_error(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(tmp_path, *recipe_files, data={"collator": "fancy"})
    with pytest.raises(KilnError) as info:
        Trainer(cfg).setup()
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.collator: unknown collator 'fancy' (known: auto, causal")


# --- pad_to_multiple_of --------------------------------------------------------------------


@pytest.mark.parametrize("task", ["causal_lm", "instruction", "seq2seq"])
def test_pad_to_multiple_of_rounds_lengths_up(task: str) -> None:
    examples: list[dict[str, Any]] = [{"input_ids": [5, 6, 7]}, {"input_ids": [8] * 9}]
    if task == "instruction":
        for e in examples:
            e["labels"] = [IGNORE_INDEX, *e["input_ids"][1:]]
    if task == "seq2seq":
        examples[0]["labels"], examples[1]["labels"] = [3, 2], [4] * 5
    batch = collate(examples, pad_id=1, task=task, pad_to_multiple_of=8)
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].tolist() == [1] * 3 + [0] * 13
    assert batch["attention_mask"][1].tolist() == [1] * 9 + [0] * 7
    assert batch["input_ids"][0, 3:].eq(1).all()
    labels = batch["labels"]
    assert labels.shape[1] % 8 == 0
    if task == "seq2seq":
        assert labels.shape == (2, 8)
        assert labels[0].tolist() == [3, 2] + [IGNORE_INDEX] * 6
    else:
        assert labels[0, 3:].eq(IGNORE_INDEX).all()
        assert labels[1, 9:].eq(IGNORE_INDEX).all()
    # Already a multiple: no extra padding.
    same = collate(
        [{"input_ids": [5] * 8, "labels": [5] * 8}], pad_id=1, task=task, pad_to_multiple_of=8
    )
    assert same["input_ids"].shape == (1, 8)


def test_trainer_batches_use_pad_to_multiple_of(tmp_path: Path, recipe_files) -> None:
    cfg = tiny_config(
        tmp_path, *recipe_files, data={"packing": False, "pad_to_multiple_of": 16, "max_length": 40}
    )
    trainer = Trainer(cfg)
    trainer.setup()
    trainer.cursor = BatchCursor(len(trainer.train_data), 4, seed=0)
    trainer._epochs_ended = 0
    for _ in range(3):
        batch = trainer._next_batch()
        assert batch["input_ids"].shape[1] % 16 == 0
        assert int(batch["attention_mask"].sum()) < batch["input_ids"].numel()


# --- group_by_length -----------------------------------------------------------------------


def _lengths(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 200, (n,), generator=torch.Generator().manual_seed(seed))


def _padded_tokens(order: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> int:
    usable = len(order) - len(order) % batch_size
    batches = lengths[order[:usable]].view(-1, batch_size)
    return int(batches.max(dim=1).values.sum()) * batch_size


def test_grouped_order_is_a_seeded_permutation() -> None:
    lengths = _lengths(1003)
    a = grouped_permutation(lengths, 8, seed=5, epoch=2)
    assert torch.equal(a, grouped_permutation(lengths, 8, seed=5, epoch=2))
    assert torch.equal(a.sort().values, torch.arange(1003))
    assert not torch.equal(a, grouped_permutation(lengths, 8, seed=5, epoch=3))
    assert not torch.equal(a, grouped_permutation(lengths, 8, seed=6, epoch=2))
    # The dropped tail (partial batch) is the plain permutation's, so a random choice.
    assert torch.equal(a[-3:], epoch_permutation(1003, 5, 2)[-3:])
    # Each mega-batch holds the same samples as the plain permutation's slice.
    mega = MEGA_BATCHES * 8
    assert torch.equal(a[:mega].sort().values, epoch_permutation(1003, 5, 2)[:mega].sort().values)


def test_grouped_order_reduces_padding() -> None:
    lengths = _lengths(4000)
    grouped = grouped_permutation(lengths, 8, seed=0, epoch=0)
    plain = epoch_permutation(4000, 0, 0)
    assert _padded_tokens(grouped, lengths, 8) < 0.7 * _padded_tokens(plain, lengths, 8)


def test_grouped_cursor_resumes_identically_across_epochs() -> None:
    lengths = _lengths(203)
    full = BatchCursor(203, 4, seed=3, lengths=lengths)
    reference = [full.next_indices() for _ in range(120)]  # 50 batches per epoch: 2+ epochs
    assert torch.equal(
        torch.cat(reference[:50]), grouped_permutation(lengths, 4, seed=3, epoch=0)[:200]
    )
    for cut in (1, 37, 49, 50, 77):
        partial = BatchCursor(203, 4, seed=3, lengths=lengths)
        for _ in range(cut):
            partial.next_indices()
        resumed = BatchCursor(203, 4, seed=3, lengths=lengths, **partial.state_dict())
        for want in reference[cut:]:
            assert torch.equal(resumed.next_indices(), want)
    # Ranks split each global batch of the grouped order.
    ranks = [BatchCursor(203, 2, seed=3, rank=r, world_size=2, lengths=lengths) for r in (0, 1)]
    for want in reference[:60]:
        assert torch.equal(torch.cat([c.next_indices() for c in ranks]), want)
    with pytest.raises(ValueError, match="lengths has 5 entries"):
        BatchCursor(203, 4, seed=3, lengths=lengths[:5])


# --- packed documents ----------------------------------------------------------------------


class _CharTokenizer:
    """A stand-in fast tokenizer: one id per character."""

    eos_token_id = 1

    def __call__(self, texts: list[str], **_: Any) -> dict[str, list[list[int]]]:
        return {"input_ids": [[2 + ord(c) % 60 for c in t] for t in texts]}


def test_position_ids_restart_per_document() -> None:
    ds = TokenDataset(torch.arange(12).view(2, 6), doc_starts=[0, 3, 8])
    pos = ds.block_position_ids(torch.tensor([0, 1, 1]))
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3], [0, 1, 0, 1, 2, 3]]
    batch = packed_batch(ds, torch.tensor([1, 0]))
    # Position 0 of a block is never predicted (the loss shifts): it keeps its id.
    assert batch["labels"].tolist() == [[6, 7, -100, 9, 10, 11], [0, 1, 2, -100, 4, 5]]
    assert torch.equal(batch["position_ids"], ds.block_position_ids(torch.tensor([1, 0])))
    assert "attention_mask" not in batch
    # No document starts inside these blocks: the model's own positions, no position_ids.
    whole = TokenDataset(torch.arange(12).view(2, 6), doc_starts=[0, 6])
    plain = packed_batch(whole, torch.tensor([1, 0]))
    assert set(plain) == {"input_ids", "labels"}
    assert torch.equal(plain["labels"], plain["input_ids"])
    assert ds.block_position_ids(torch.tensor([0]))[0].tolist() != list(range(6))
    assert whole.block_position_ids(torch.tensor([1, 0])).eq(torch.arange(6)).all()
    # Two documents start inside a block (offsets 3 and 8): their first tokens are no targets.
    assert ds.num_tokens == 2 * 5 - 2
    assert ds.without_documents().num_tokens == 10
    assert "position_ids" not in packed_batch(ds.without_documents(), torch.tensor([0]))
    with pytest.raises(ValueError, match="rise strictly"):
        TokenDataset(torch.zeros(2, 3, dtype=torch.int64), doc_starts=[0, 6])
    with pytest.raises(ValueError, match="needs a blocks tensor"):
        TokenDataset([[1, 2]], doc_starts=[0])


def test_tokenize_causal_records_document_starts() -> None:
    texts = ["abcde", "xy", "hello world", "q", "zzzzzzz", "end of it"]
    ds = tokenize_causal(texts, _CharTokenizer(), max_length=8, packing=True)
    assert ds.blocks is not None
    flat = ds.blocks.flatten()
    starts = ds.doc_starts
    assert starts is not None
    assert starts[0] == 0
    # Every document starts right after an EOS (the separator), and only there.
    after_eos = (torch.nonzero(flat[:-1] == 1).flatten() + 1).tolist()
    assert starts[1:].tolist() == after_eos
    # num_tokens is what the loss counts over all blocks.
    all_blocks = packed_batch(ds, torch.arange(len(ds)))
    assert count_targets(all_blocks, "causal_lm") == ds.num_tokens
    plain = tokenize_causal(texts, _CharTokenizer(), 8, True, isolate_documents=False)
    assert plain.doc_starts is None
    assert torch.equal(plain.blocks, ds.blocks)


def _tiny_model(arch: str, attn: str) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(
            vocab_size=64,
            n_embd=32,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=1,
            eos_token_id=1,
        )
        model = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            bos_token_id=1,
            eos_token_id=1,
            pad_token_id=0,
        )
        model = LlamaForCausalLM(config)
    model.config._attn_implementation = attn
    return model.float().eval()


def _segments(ds: TokenDataset) -> list[list[int]]:
    """Each document's part in each block, as a sequence of its own."""
    assert ds.blocks is not None
    assert ds.doc_starts is not None
    length = ds.blocks.shape[1]
    cuts = sorted(set(ds.doc_starts.tolist()) | set(range(0, ds.blocks.numel() + 1, length)))
    flat = ds.blocks.flatten().tolist()
    return [flat[a:b] for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_loss_equals_each_document_alone(arch: str, attn: str) -> None:
    texts = ["abcdef", "xy", "hello world", "q", "zzzzzzzzz", "end of it", "more text here"]
    ds = tokenize_causal(texts, _CharTokenizer(), max_length=12, packing=True)
    model = _tiny_model(arch, attn)
    with torch.no_grad():
        packed = packed_batch(ds, torch.arange(len(ds)))
        packed_sum, _, _ = forward_loss_sum(model, packed, "causal_lm")
        alone = collate([{"input_ids": s} for s in _segments(ds)], pad_id=0, task="causal_lm")
        alone_sum, _, _ = forward_loss_sum(model, alone, "causal_lm")
        leaky = packed_batch(ds.without_documents(), torch.arange(len(ds)))
        leaky_sum, _, _ = forward_loss_sum(model, leaky, "causal_lm")
    n = count_targets(packed, "causal_lm")
    assert n == count_targets(alone, "causal_lm") == ds.num_tokens
    torch.testing.assert_close(packed_sum / n, alone_sum / n, rtol=1e-5, atol=1e-5)
    # Without isolation the documents see each other: the check above is not vacuous.
    assert abs(float(leaky_sum) / count_targets(leaky, "causal_lm") - float(alone_sum) / n) > 1e-4


def test_trainer_packed_batches_carry_position_ids(tmp_path: Path, recipe_files) -> None:
    trainer = Trainer(tiny_config(tmp_path, *recipe_files))
    trainer.setup()
    assert trainer.train_data.doc_starts is not None
    trainer.cursor = BatchCursor(len(trainer.train_data), 4, seed=0)
    trainer._epochs_ended = 0
    batch = trainer._next_batch()
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    starts = batch["position_ids"] == 0
    assert starts[:, 0].all()
    assert starts[:, 1:].any()
    starts[:, 0] = False  # a block's first token is never a target: it keeps its id
    assert batch["labels"][starts].eq(IGNORE_INDEX).all()
    assert torch.equal(batch["labels"][~starts], batch["input_ids"][~starts])

    off = Trainer(tiny_config(tmp_path / "off", *recipe_files, data={"isolate_documents": False}))
    off.setup()
    assert off.train_data.doc_starts is None
    assert off.train_data.num_tokens == len(off.train_data) * 31


# --- resume stays bit-exact ----------------------------------------------------------------


class _StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer) -> None:
        if trainer.state.step == self.step:
            trainer.control.request_stop(StopRequest("requested", "test", resumable=True))


@pytest.mark.parametrize(
    "data",
    [
        {},  # packed, isolated documents
        {"packing": False, "group_by_length": True, "pad_to_multiple_of": 8},
    ],
    ids=["packed", "grouped"],
)
def test_resume_is_bit_exact(tmp_path: Path, recipe_files, data: dict[str, Any]) -> None:
    sections = {
        "data": data,
        "model": {"dropout": 0.1},
        "train": {"max_steps": 6, "batch_size": 3, "grad_accum_steps": 2},
        "eval": {"every_steps": 3},
    }
    ref_cfg = tiny_config(tmp_path / "ref", *recipe_files, **sections)
    ref = Trainer(ref_cfg).fit()
    cfg = tiny_config(tmp_path / "cut", *recipe_files, **sections)
    Trainer(cfg, callbacks=[_StopAt(2)]).fit()
    resumed = Trainer(cfg, resume=True).fit()
    assert resumed.loss_history == ref.loss_history
    assert resumed.metrics == ref.metrics
    lines = (tmp_path / "ref" / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines][-1] == 6
