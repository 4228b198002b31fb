"""Tokenization cache (`kiln.data.cache`) and data.num_workers: hits, misses, corruption."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import make_rows, tiny_config
from transformers import PreTrainedTokenizerFast

import kiln.data.tokenize as tokenize_module
from kiln.config import RunConfig
from kiln.data import build_datasets
from kiln.data.cache import tokenizer_fingerprint
from kiln.data.dataset import TokenDataset
from kiln.models.tokenizer import train_bpe_tokenizer

ROWS = make_rows(60, seed=3)
SEQ2SEQ = {
    "task": "seq2seq",
    "model": {"arch": "t5"},
    "data": {"source_template": "{title}", "target_template": "{text}"},
}
INSTRUCTION = {
    "task": "instruction",
    "data": {"prompt_template": "{title}\n", "response_template": "{text}", "max_length": 48},
}


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer((r["text"] for r in make_rows(200)), vocab_size=300)


def config(tmp_path: Path, **sections: Any) -> RunConfig:
    data = {"train": str(tmp_path / "unused.jsonl"), "cache_dir": str(tmp_path / "cache")}
    data.update(sections.pop("data", {}))
    return tiny_config(tmp_path, tmp_path / "unused.jsonl", None, data=data, **sections)


def build(
    cfg: RunConfig, tokenizer: PreTrainedTokenizerFast, rows: list[dict[str, Any]] = ROWS
) -> tuple[TokenDataset, TokenDataset | None, Any]:
    return build_datasets(cfg, tokenizer, rows[:50], rows[50:])


def assert_same(a: TokenDataset | None, b: TokenDataset | None) -> None:
    assert a is not None
    assert b is not None
    va, vb = vars(a), vars(b)
    assert va.keys() == vb.keys()
    for name in va:
        x, y = va[name], vb[name]
        if isinstance(x, tuple):
            assert all(torch.equal(p, q) for p, q in zip(x, y, strict=True)), name
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert x == y, name
    assert a.num_tokens == b.num_tokens
    assert len(a) == len(b)


class Calls:
    """Counts `encode` calls (the tokenizer's only way in), or forbids them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, forbid: bool = False) -> None:
        self.n = 0
        real = tokenize_module.encode

        def counted(*args: Any, **kwargs: Any) -> Any:
            if forbid:
                raise AssertionError("the tokenizer was called")
            self.n += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(tokenize_module, "encode", counted)


def entries(cfg: RunConfig) -> list[Path]:
    assert cfg.data.cache_dir is not None
    return sorted(p for p in Path(cfg.data.cache_dir).iterdir() if not p.name.startswith("."))


@pytest.mark.parametrize(
    "sections",
    [{}, {"data": {"packing": False}}, SEQ2SEQ, INSTRUCTION],
    ids=["packed", "unpacked", "seq2seq", "instruction"],
)
def test_second_build_loads_identical_data_without_tokenizing(
    tmp_path: Path,
    tokenizer: PreTrainedTokenizerFast,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    sections: dict[str, Any],
) -> None:
    cfg = config(tmp_path, **sections)
    train, val, stats = build(cfg, tokenizer)
    assert len(entries(cfg)) == 2  # train and val
    with monkeypatch.context() as m:
        Calls(m, forbid=True)
        with caplog.at_level(logging.INFO, logger="kiln"):
            train2, val2, stats2 = build(cfg, tokenizer)
    assert caplog.text.count("tokenized data from cache") == 2
    assert_same(train, train2)
    assert_same(val, val2)
    assert stats2 == stats
    assert stats.train_tokens == train.num_tokens > 0
    uncached = build(
        config(
            tmp_path,
            data={"cache_dir": None, **sections.get("data", {})},
            **{k: v for k, v in sections.items() if k != "data"},
        ),
        tokenizer,
    )
    assert_same(train, uncached[0])
    assert uncached[2] == stats


def test_changed_data_tokenizer_or_settings_miss(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path)
    build(cfg, tokenizer)
    calls = Calls(monkeypatch)
    build(cfg, tokenizer)
    assert calls.n == 0
    changed = [dict(r) for r in ROWS]
    changed[3]["text"] += " more"  # one training row
    build(cfg, tokenizer, changed)
    assert calls.n == 1  # val is unchanged: still a hit
    other = train_bpe_tokenizer((r["text"] for r in make_rows(200)), vocab_size=280)
    assert tokenizer_fingerprint(other) != tokenizer_fingerprint(tokenizer)
    build(cfg, other)
    assert calls.n == 3
    for data in ({"max_length": 16}, {"packing": False}, {"isolate_documents": False}):
        before = calls.n
        build(config(tmp_path, data=data), tokenizer)
        assert calls.n == before + 2, data
    before = calls.n  # settings that do not change tokens still hit
    build(config(tmp_path, data={"group_by_length": True, "num_workers": 1}), tokenizer)
    assert calls.n == before


def test_corrupt_or_partial_entry_is_rebuilt(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path)
    train, val, _ = build(cfg, tokenizer)
    first, second = entries(cfg)
    data = first / "data.pt"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated write
    (second / "meta.json").unlink()  # partial entry
    with caplog.at_level(logging.WARNING, logger="kiln"):
        train2, val2, _ = build(cfg, tokenizer)
    assert caplog.text.count("ignoring unreadable tokenization cache entry") == 2
    assert_same(train, train2)
    assert_same(val, val2)
    assert entries(cfg) == [first, second]  # rewritten
    train3, _, _ = build(cfg, tokenizer)
    assert_same(train, train3)


def test_null_cache_dir_disables(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, data={"cache_dir": None})
    calls = Calls(monkeypatch)
    build(cfg, tokenizer)
    build(cfg, tokenizer)
    assert calls.n == 4
    assert not (tmp_path / "cache").exists()


def test_cache_hit_repeats_the_build_warnings(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = config(tmp_path, **INSTRUCTION)
    rows = [*ROWS[:50], {"title": "x " * 40, "text": "y"}, *ROWS[50:]]
    with caplog.at_level(logging.WARNING, logger="kiln"):
        _, _, stats = build_datasets(cfg, tokenizer, rows[:51], rows[51:])
        first = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
        caplog.clear()
        _, _, stats2 = build_datasets(cfg, tokenizer, rows[:51], rows[51:])
        again = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert first
    assert again == first
    assert stats2 == stats
    assert stats.dropped["no_target"] >= 1


@pytest.mark.parametrize("sections", [{}, INSTRUCTION], ids=["packed", "instruction"])
def test_num_workers_gives_identical_data(
    tmp_path: Path, tokenizer: PreTrainedTokenizerFast, sections: dict[str, Any]
) -> None:
    data = sections.get("data", {})
    rest = {k: v for k, v in sections.items() if k != "data"}
    serial = build(config(tmp_path, data={**data, "cache_dir": None}, **rest), tokenizer)
    workers = build(
        config(tmp_path, data={**data, "cache_dir": None, "num_workers": 2}, **rest), tokenizer
    )
    assert_same(serial[0], workers[0])
    assert_same(serial[1], workers[1])


def test_worker_processes_match_in_process_encoding(
    tokenizer: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts = [r["text"] for r in make_rows(40)]
    expected = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    assert list(tokenize_module.encode(texts, tokenizer)) == expected  # the Rust fast path
    # A tokenizer without a plain backend goes to worker processes (texts > one chunk).
    monkeypatch.setattr(tokenize_module, "_plain_backend", lambda tok: None)
    monkeypatch.setattr(tokenize_module, "_CHUNK", 8)
    with tokenize_module.encode_workers(2):
        assert list(tokenize_module.encode(texts, tokenizer)) == expected


def test_a_run_from_the_cache_takes_its_tokenizer_from_there_too(
    tmp_path: Path, recipe_files, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kiln import Trainer
    from kiln.models import tokenizer as tokenizer_module

    trained = []
    real = tokenizer_module.train_bpe_tokenizer

    def counting(*args: Any, **kwargs: Any) -> Any:
        trained.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tokenizer_module, "train_bpe_tokenizer", counting)

    def run(name: str, **tokenizer: Any) -> tuple[Any, Any]:
        cfg = tiny_config(tmp_path, *recipe_files, train={"max_steps": 4})
        cfg = cfg.replace(
            output_dir=str(tmp_path / name), **{f"tokenizer.{k}": v for k, v in tokenizer.items()}
        )
        trainer = Trainer(cfg)
        return trainer, trainer.fit()

    first, first_result = run("first")
    assert len(trained) == 1
    with caplog.at_level(logging.INFO, logger="kiln"):
        second, second_result = run("second")
    assert len(trained) == 1  # not trained again
    assert any(m.startswith("tokenizer from cache ") for m in caplog.messages)
    tok_a, tok_b = first.parts.tokenizer, second.parts.tokenizer
    assert tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(tok_b)
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert second_result.loss_history == first_result.loss_history
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(tensor, second.model.state_dict()[name]), name
    # A corrupt entry is trained again (and replaced); another vocab size is another entry.
    (entry,) = (tmp_path / "cache").glob("tokenizer-*")
    (entry / "tokenizer.json").write_text("{not json")
    _, third_result = run("third")
    assert len(trained) == 2
    assert third_result.loss_history == first_result.loss_history
    run("fourth", vocab_size=290)
    assert len(trained) == 3
    assert len(list((tmp_path / "cache").glob("tokenizer-*"))) == 2
