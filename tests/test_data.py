"""Tests for kiln.data: sources, checks and filters, split, tokenization, collate, sampler."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import bpe_tokenizer
from transformers import PreTrainedTokenizerFast

from kiln.config import RunConfig, load_config
from kiln.data import (
    BatchCursor,
    DataStats,
    Row,
    TokenDataset,
    batches_per_epoch,
    build_datasets,
    collate,
    epoch_permutation,
    load_splits,
    prepare_data,
    read_jsonl,
    sequential_batches,
    split_indices,
    tokenize_causal,
    tokenize_seq2seq,
)
from kiln.errors import DataError

CORPUS = [
    "Lemon rice with peas and cumin.",
    "Boil the pasta in salted water until tender.",
    "Whisk eggs, sugar and butter; fold in the flour.",
    "Roast the carrots with honey and thyme.",
    "Simmer the lentils with garlic, onion and tomato.",
]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained in-process (no network)."""
    return bpe_tokenizer(CORPUS)


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_cfg(tmp_path: Path, task: str = "causal_lm", **data: Any) -> RunConfig:
    arch = "t5" if task == "seq2seq" else "gpt2"
    data.setdefault("train", str(tmp_path / "train.jsonl"))
    return load_config(
        data={"task": task, "model": {"arch": arch}, "data": data, "train": {"max_steps": 10}}
    )


def ids_of(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- sources -------------------------------------------------------------------------------


def test_read_jsonl_rows_keep_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n   \n{"text": "b"}\n')
    rows = read_jsonl(path)
    assert rows == [{"text": "a"}, {"text": "b"}]
    assert [r.line for r in rows] == [1, 4]
    assert rows[1].where == f"{path}:4"
    assert pickle.loads(pickle.dumps(rows[1])).where == rows[1].where


def test_read_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok"}\n{"text": \n[1, 2]\n"str"\n')
    with pytest.raises(DataError) as exc:
        read_jsonl(path)
    problems = exc.value.problems
    assert len(problems) == 3
    assert problems[0].startswith(f"{path}:2: invalid JSON (")
    assert problems[1] == f"{path}:3: expected a JSON object, got array"
    assert problems[2] == f"{path}:4: expected a JSON object, got string"


def test_read_jsonl_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file$"):
        read_jsonl(path)


# --- checks, filters, split ----------------------------------------------------------------


def test_missing_and_wrong_type_text_field_name_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}, {"body": "b"}, {"text": 3}])
    with pytest.raises(DataError) as exc:
        load_splits(make_cfg(tmp_path))
    assert exc.value.problems == [
        f"{path}:2: missing field 'text'",
        f"{path}:3: field 'text' must be a string, got number",
    ]


def test_quality_filter_and_dedup_counts(tmp_path: Path) -> None:
    rows = [
        {"text": "keep one", "quality_score": 0.9},
        {"text": "too low", "quality_score": 0.2},
        {"text": "keep one", "quality_score": 0.8},  # duplicate of row 1
        {"text": "keep two", "quality_score": 0.5},
        {"text": "low too", "quality_score": 0.1},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(tmp_path, min_quality_score=0.5, val_split=0.0)
    train, val, stats = load_splits(cfg)
    assert [r["text"] for r in train] == ["keep one", "keep two"]
    assert val == []
    assert stats.rows_read == 5
    assert stats.dropped == {"low_quality": 2, "too_long": 0, "duplicate": 1, "max_samples": 0}
    assert (stats.train_rows, stats.val_rows) == (2, 0)


def test_quality_field_missing_names_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "quality_score": 1}, {"text": "b"}])
    with pytest.raises(DataError, match=rf"^{path}:2: missing field 'quality_score'"):
        load_splits(make_cfg(tmp_path, min_quality_score=0.5))


def test_everything_filtered_says_why(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "quality_score": 0.1}] * 3)
    with pytest.raises(DataError, match=r"no rows left.*3 read: 3 below data\.min_quality_score"):
        load_splits(make_cfg(tmp_path, min_quality_score=0.5))


def test_split_is_deterministic_disjoint_and_covering(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"doc {i}"} for i in range(30)])
    cfg = make_cfg(tmp_path, val_split=0.1)
    train, val, _ = load_splits(cfg)
    again, val_again, _ = load_splits(cfg)
    texts, val_texts = [r["text"] for r in train], [r["text"] for r in val]
    assert (texts, val_texts) == ([r["text"] for r in again], [r["text"] for r in val_again])
    assert len(val) == 3  # ceil(0.1 * 30) = 3, though 0.1 * 30 > 3.0 in floating point
    assert len(train) == 27
    assert set(texts).isdisjoint(val_texts)
    assert sorted(texts + val_texts) == sorted(f"doc {i}" for i in range(30))
    other = load_splits(make_cfg(tmp_path, val_split=0.1).model_copy(update={"seed": 7}))[1]
    assert [r["text"] for r in other] != val_texts
    assert split_indices(10, 0.25, 3) == split_indices(10, 0.25, 3)
    assert len(split_indices(10, 0.25, 3)[1]) == 3


def test_explicit_val_file_and_max_samples(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": f"t{i}"} for i in range(6)])
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"text": "v0"}, {"text": "v0"}, {"text": "v1"}])
    cfg = make_cfg(tmp_path, val=str(val_path), max_samples=4)
    train, val, stats = load_splits(cfg)
    assert [r["text"] for r in train] == ["t0", "t1", "t2", "t3"]
    assert [r["text"] for r in val] == ["v0", "v1"]
    assert stats.rows_read == 9
    assert stats.dropped == {"low_quality": 0, "too_long": 0, "duplicate": 1, "max_samples": 2}


def test_val_file_rows_are_checked(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    val_path = write_jsonl(tmp_path / "val.jsonl", [{"txt": "v"}])
    with pytest.raises(DataError, match=rf"^{val_path}:1: missing field 'text'$"):
        load_splits(make_cfg(tmp_path, val=str(val_path)))


# --- tokenization --------------------------------------------------------------------------


def test_packing_blocks_equal_the_eos_separated_stream(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    stream = [t for text in CORPUS for t in [*ids_of(tokenizer, text), eos]]
    ds = tokenize_causal(CORPUS, tokenizer, max_length=8, packing=True)
    n = len(stream) // 8
    assert ds.blocks is not None
    assert ds.blocks.dtype == torch.int64
    assert ds.blocks.shape == (n, 8)
    assert len(ds) == n
    assert ds.blocks.flatten().tolist() == stream[: n * 8]
    assert ds[0]["input_ids"].tolist() == stream[:8]
    # Isolated documents (the default): a document's first token inside a block is no target.
    assert ds.doc_starts is not None
    assert ds.num_tokens == n * 7 - int((ds.doc_starts % 8 != 0).sum())


def test_packing_without_one_block_is_an_error(tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(DataError, match=r"fewer than one block of data\.max_length=512"):
        tokenize_causal(["short"], tokenizer, max_length=512, packing=True)


def test_unpacked_documents_are_truncated(tokenizer: PreTrainedTokenizerFast) -> None:
    eos = tokenizer.eos_token_id
    ds = tokenize_causal(CORPUS, tokenizer, max_length=6, packing=False)
    assert ds.blocks is None
    assert len(ds) == len(CORPUS)
    for i, text in enumerate(CORPUS):
        assert ds[i]["input_ids"].tolist() == [*ids_of(tokenizer, text), eos][:6]
    short = tokenize_causal(["ab"], tokenizer, max_length=50, packing=False)
    assert short[0]["input_ids"].tolist() == [*ids_of(tokenizer, "ab"), eos]


def test_seq2seq_templates_with_list_fields_and_label_eos(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast
) -> None:
    rows = [
        {"title": "Lemon rice", "ingredients": ["rice", "lemon"], "steps": "Boil. Squeeze."},
        {"title": "Toast", "ingredients": ["bread"], "steps": "Toast the bread until golden."},
    ]
    write_jsonl(tmp_path / "train.jsonl", rows)
    cfg = make_cfg(
        tmp_path,
        task="seq2seq",
        source_template="Title: {title}\nIngredients:\n{ingredients}",
        target_template="{steps}",
        val_split=0.0,
        max_length=64,
        max_target_length=5,
    )
    train_ds, val_ds, stats = prepare_data(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    assert val_ds is None
    assert len(train_ds) == 2
    assert train_ds.has_labels
    ex = train_ds[0]
    assert ex["input_ids"].tolist() == [
        *ids_of(tokenizer, "Title: Lemon rice\nIngredients:\nrice\nlemon"),
        eos,
    ]
    target = ids_of(tokenizer, "Toast the bread until golden.")
    assert train_ds[1]["labels"].tolist() == [*target[:4], eos]
    assert stats.train_tokens == train_ds.num_tokens == sum(len(e["labels"]) for e in train_ds)
    assert (stats.train_examples, stats.train_rows) == (2, 2)


def test_seq2seq_truncates_input_with_eos(tokenizer: PreTrainedTokenizerFast) -> None:
    ds = tokenize_seq2seq([CORPUS[1]], ["x"], tokenizer, max_length=4, max_target_length=8)
    eos = tokenizer.eos_token_id
    assert ds[0]["input_ids"].tolist() == [*ids_of(tokenizer, CORPUS[1])[:3], eos]
    assert ds[0]["labels"].tolist() == [*ids_of(tokenizer, "x"), eos]


def test_missing_template_field_is_named(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", [{"title": "a", "steps": "b"}] * 2)
    cfg = make_cfg(
        tmp_path, task="seq2seq", source_template="{title} {cuisine}", target_template="{steps}"
    )
    with pytest.raises(DataError) as exc:
        load_splits(cfg)
    assert exc.value.problems == [
        f"data.source_template: field 'cuisine' is not in the rows ({path}:1)"
    ]


def test_build_datasets_fills_stats(tmp_path: Path, tokenizer: PreTrainedTokenizerFast) -> None:
    write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in CORPUS * 4])  # 15 duplicates
    write_jsonl(tmp_path / "val.jsonl", [{"text": t} for t in CORPUS[:2]])
    cfg = make_cfg(tmp_path, val=str(tmp_path / "val.jsonl"), max_length=8)
    train_rows, val_rows, stats = load_splits(cfg)
    train_ds, val_ds, full = build_datasets(cfg, tokenizer, train_rows, val_rows, stats=stats)
    assert stats.train_examples == 0  # the input stats are not modified
    assert isinstance(full, DataStats)
    assert full.dropped["duplicate"] == 15
    assert val_ds is not None
    assert full.val_examples == len(val_ds) > 0
    assert train_ds.doc_starts is not None
    assert full.train_tokens == len(train_ds) * 7 - int((train_ds.doc_starts % 8 != 0).sum())
    assert full.to_dict()["train_examples"] == len(train_ds)


def test_token_dataset_from_lists_and_tensor() -> None:
    ds = TokenDataset([[5, 6, 7], [8], []], labels=[[1], [2, 3], [4]])
    assert len(ds) == 3
    assert ds.has_labels
    assert ds.blocks is None
    assert ds[1]["input_ids"].tolist() == [8]
    assert ds[1]["labels"].tolist() == [2, 3]
    assert ds[-1]["input_ids"].tolist() == []
    assert ds.num_tokens == 4
    assert TokenDataset([[1, 2, 3], [4, 5]]).num_tokens == 3
    blocks = TokenDataset(torch.arange(12, dtype=torch.int32).view(3, 4))
    assert blocks.blocks is not None
    assert blocks.blocks.dtype == torch.int64
    assert blocks[2]["input_ids"].tolist() == [8, 9, 10, 11]
    assert blocks.num_tokens == 9
    with pytest.raises(IndexError):
        blocks[3]
    with pytest.raises(ValueError, match="labels has 2 sequences"):
        TokenDataset([[1]], labels=[[1], [2]])
    copy = pickle.loads(pickle.dumps(ds))
    assert copy[0]["input_ids"].tolist() == [5, 6, 7]


# --- collate -------------------------------------------------------------------------------


def test_collate_causal_pads_and_masks_labels() -> None:
    pad = 1  # equal to a real token below: padding must come from lengths, not from values
    batch = collate([{"input_ids": [4, 1, 6]}, {"input_ids": torch.tensor([7])}], pad, "causal_lm")
    assert batch["input_ids"].tolist() == [[4, 1, 6], [7, 1, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[4, 1, 6], [7, -100, -100]]  # not shifted
    assert all(t.dtype == torch.int64 for t in batch.values())
    wide = collate([{"input_ids": [4, 5, 6]}], pad, "causal_lm", pad_to_multiple_of=4)
    assert wide["labels"].tolist() == [[4, 5, 6, -100]]


def test_collate_stacks_equal_length_blocks() -> None:
    ds = TokenDataset(torch.arange(8).view(2, 4))
    batch = collate([ds[0], ds[1]], pad_id=0, task="causal_lm")
    assert torch.equal(batch["input_ids"], torch.arange(8).view(2, 4))
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert batch["labels"].data_ptr() != batch["input_ids"].data_ptr()
    assert bool(batch["attention_mask"].all())


def test_collate_seq2seq() -> None:
    examples = [
        {"input_ids": [3, 4, 2], "labels": [5, 2]},
        {"input_ids": [6, 2], "labels": [7, 8, 9, 2]},
    ]
    batch = collate(examples, pad_id=0, task="seq2seq")
    assert batch["input_ids"].tolist() == [[3, 4, 2], [6, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 2, -100, -100], [7, 8, 9, 2]]


# --- sampler -------------------------------------------------------------------------------


def test_epoch_permutation_is_deterministic_per_seed_and_epoch() -> None:
    state = torch.random.get_rng_state()
    p0 = epoch_permutation(50, seed=1, epoch=0)
    assert torch.equal(p0, epoch_permutation(50, seed=1, epoch=0))
    assert not torch.equal(p0, epoch_permutation(50, seed=1, epoch=1))
    assert not torch.equal(p0, epoch_permutation(50, seed=2, epoch=0))
    assert sorted(p0.tolist()) == list(range(50))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched


def test_cursor_resume_yields_the_same_remaining_batches() -> None:
    n, bs = 23, 4
    assert batches_per_epoch(n, bs) == 5
    assert batches_per_epoch(n, bs, drop_last=False) == 6
    full = BatchCursor(n, bs, seed=3)
    reference = [full.next_indices().tolist() for _ in range(17)]
    first = reference[:5]
    assert all(len(b) == bs for b in reference)  # partial batch dropped
    assert len({i for b in first for i in b}) == 20  # no repeats within an epoch
    assert first[0] == epoch_permutation(n, 3, 0)[:4].tolist()
    assert reference[5] == epoch_permutation(n, 3, 1)[:4].tolist()

    partial = BatchCursor(n, bs, seed=3)
    for _ in range(7):
        partial.next_indices()
    state = partial.state_dict()
    assert state == {"epoch": 1, "cursor": 8}
    resumed = BatchCursor(n, bs, seed=3, **state)
    assert [resumed.next_indices().tolist() for _ in range(10)] == reference[7:]
    loaded = BatchCursor(n, bs, seed=3)
    loaded.load_state_dict(state)
    assert next(iter(loaded)).tolist() == reference[7]


def test_cursor_ranks_split_the_global_batch() -> None:
    single = BatchCursor(16, 4, seed=0)
    ranks = [BatchCursor(16, 2, seed=0, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        assert single.next_indices().tolist() == [
            i for c in ranks for i in c.next_indices().tolist()
        ]
    assert ranks[0].state_dict() == single.state_dict()


def test_cursor_and_sequential_batches_edges() -> None:
    with pytest.raises(DataError, match=r"lower train\.batch_size"):
        BatchCursor(3, 4, seed=0)
    assert [b.tolist() for b in sequential_batches(5, 2)] == [[0, 1], [2, 3], [4]]
    assert Row({"a": 1}, "f", 2).where == "f:2"


def test_truncation_off_names_the_long_rows(tokenizer: PreTrainedTokenizerFast) -> None:
    from kiln.data.tokenize import tokenize_causal, tokenize_seq2seq

    tok = tokenizer
    texts = ["short", "a much longer text " * 20]
    with pytest.raises(DataError) as info:
        tokenize_causal(
            texts, tok, 16, packing=False, truncation=False, locations=["f.jsonl:1", "f.jsonl:2"]
        )
    lines = info.value.problems
    assert lines[0].startswith("f.jsonl:2: ")
    assert "exceed data.max_length=16" in lines[0]
    assert lines[-1] == "raise data.max_length or set data.truncation: true"
    assert len(tokenize_causal(texts, tok, 16, packing=False)) == 2  # truncation on: cut
    with pytest.raises(DataError, match=r"f\.jsonl:1: .* exceed data\.max_target_length=8"):
        tokenize_seq2seq(["x"], [texts[1]], tok, 16, 8, truncation=False, locations=["f.jsonl:1"])
